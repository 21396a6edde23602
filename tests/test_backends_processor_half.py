"""Issue 31: Qwen2.5-Omni's and Phi-4-multimodal's backends go through their processor classes (``Qwen2_5OmniProcessor``,
``Phi4MultimodalProcessor``; without torchvision their audio halves, ``processor_half``). The rendered chat prompt and
the audio token count are checked against the processor class built here independently (its ``__call__`` on text +
audio, its chat template rendered by transformers), on a long and an odd-length clip, with the model's forward on
the processor's output; the whole processor (with torchvision) against its audio half."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tone, without_vision
from test_backends import _phi4, tiny_omni_dir, tiny_phi4_dir  # noqa: F401 (fixtures)
from test_lslm import req

from lmeval_speech.models.lslm import LSLM

# Chat templates in the shape of the families' processor templates (content items; one audio item written as the
# processor's placeholder), saved as the processor's own file (chat_template.json); the tokenizer keeps another one
# (a plain ChatML without audio items), as Qwen2.5-Omni's checkpoints ship a processor template besides the
# tokenizer's. The released templates cannot be downloaded where these tests run.
OMNI_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'audio' %}Audio: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PHI4_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'audio' %}<|endoftext11|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = [{"role": "system", "content": "About geography."}, {"role": "user", "content": "Question: <audio>\nAnswer:"}]
#: a long clip (the tiny Qwen2.5-Omni feature extractor's 30 s window, less one odd sample) and an odd-length one
CLIPS = {"long": 479_999, "odd": 16_161}


def with_processor_template(src, dst, template):
    shutil.copytree(src, dst)
    (Path(dst) / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return str(dst)


def _independent(cls, path, **parts):
    """``cls`` built here from the checkpoint's files without its image (and video) processor
    (``conftest.without_vision``; the backend's loader is not used)."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    template = json.loads((Path(path) / "chat_template.json").read_text())["chat_template"]
    return without_vision(cls, tokenizer=AutoTokenizer.from_pretrained(path), chat_template=template,
                          **{k: AutoFeatureExtractor.from_pretrained(path) if v == "audio" else None
                             for k, v in parts.items()})


def _structured(desc, question="Question: ", answer="\nAnswer:"):
    return [{"role": "user", "content": [{"type": "text", "text": f"{desc}\n\n{question}"}, {"type": "audio"},
                                         {"type": "text", "text": answer}]}]


def check_processor_path(lm, proc, model_logits, expected_prompt, audio_id):
    """The rendered prompt is the processor's, and for each clip the audio tokens the processor's ``__call__`` writes
    are lslm's count, the score the model's forward on the processor's output."""
    speech = lm.apply_chat_template(CHAT)
    assert speech == expected_prompt
    audio_text = lm.backend_impl.chat_audio_token or lm.backend_impl.audio_placeholder
    for name, samples in CLIPS.items():
        audio = tone((samples + 0.5) / 16000, seed=samples)
        prompt = speech.replace("<audio>", audio_text)
        context = prompt.rstrip()  # lm-eval moves the context's trailing whitespace into the continuation
        ctx = proc(text=context, audio=[audio], return_tensors="pt")
        full = proc(text=prompt + " Paris", audio=[audio], return_tensors="pt")
        n = int((full["input_ids"][0] == audio_id).sum())
        assert lm.backend_impl.count_tokens(samples) == n, name
        with torch.no_grad():
            logits = model_logits(full).float()[0]
        ids = full["input_ids"][0]
        n_ctx = ctx["input_ids"].shape[1]
        expected = float(torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[n_ctx - 1:, 0].sum())
        (ll, _), = lm.loglikelihood([req(speech, " Paris", {"audio": [{"array": audio, "sampling_rate": 16000}]})])
        np.testing.assert_allclose(ll, expected, atol=1e-4, err_msg=name)


@pytest.fixture(scope="module")
def omni_with_template(tiny_omni_dir, tmp_path_factory):
    return with_processor_template(tiny_omni_dir, tmp_path_factory.mktemp("omni_tpl") / "ckpt", OMNI_TEMPLATE)


@pytest.fixture(scope="module")
def phi4_with_template(tiny_phi4_dir, tmp_path_factory):
    return with_processor_template(tiny_phi4_dir, tmp_path_factory.mktemp("phi4_tpl") / "ckpt", PHI4_TEMPLATE)


@pytest.mark.slow
def test_qwen2_5_omni_prompt_and_audio_tokens_are_its_processors(omni_with_template):
    from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    path = omni_with_template
    proc = _independent(Qwen2_5OmniProcessor, path, image_processor=None, video_processor=None,
                        feature_extractor="audio")
    lm = LSLM(pretrained=path, device="cpu", system_prompt="template")
    expected = proc.apply_chat_template(_structured("About geography."), tokenize=False, add_generation_prompt=True)
    assert "Audio: " in expected  # the processor's template, not the tokenizer's
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    check_processor_path(lm, proc, lambda x: model(**x).logits,
                         expected.replace("<|audio_bos|><|AUDIO|><|audio_eos|>", "<audio>"), model.config.audio_token_id)
    assert isinstance(lm.backend_impl.processor, Qwen2_5OmniProcessor)


@pytest.mark.slow
def test_phi4_prompt_and_audio_tokens_are_its_processors(phi4_with_template):
    from transformers import Phi4MultimodalProcessor

    path = phi4_with_template
    proc = _independent(Phi4MultimodalProcessor, path, image_processor=None, audio_processor="audio")
    lm = LSLM(pretrained=path, device="cpu", system_prompt="template")
    expected = proc.apply_chat_template(_structured("About geography."), tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<|user|>")  # the processor's template, not the tokenizer's
    model, _, _ = _phi4(path, speech_lora=True)
    check_processor_path(lm, proc, lambda x: model(**x).logits, expected.replace("<|endoftext11|>", "<audio>"),
                         model.config.audio_config.audio_token_id)
    assert isinstance(lm.backend_impl.processor, Phi4MultimodalProcessor)


@pytest.mark.parametrize("family", ["qwen2_5_omni", "phi4"])
def test_full_processor_agrees_with_its_audio_half(family, request):
    """Where torchvision imports (a GPU user's machine): the whole processor and the audio half give the same ids,
    features and chat rendering."""
    pytest.importorskip("torchvision")
    omni_with_template, phi4_with_template = (request.getfixturevalue(f) for f in ("omni_with_template",
                                                                                   "phi4_with_template"))
    from transformers import Phi4MultimodalProcessor, Qwen2_5OmniProcessor

    from lmeval_speech.models.backends.processor_half import load_processor

    cls, path, token = {"qwen2_5_omni": (Qwen2_5OmniProcessor, omni_with_template, "<|AUDIO|>"),
                        "phi4": (Phi4MultimodalProcessor, phi4_with_template, "<|endoftext11|>")}[family]
    full, half = load_processor(cls, path, full=True), load_processor(cls, path, full=False)
    audio = tone(2.3, seed=1)
    a, b = (p(text=f"Q: {token}", audio=[audio], return_tensors="pt") for p in (full, half))
    assert torch.equal(a["input_ids"], b["input_ids"])
    for key in set(a) - {"input_ids", "attention_mask"}:
        assert torch.equal(a[key], b[key]), key
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Q"}]}]
    assert full.apply_chat_template(chat, tokenize=False) == half.apply_chat_template(chat, tokenize=False)
