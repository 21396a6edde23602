"""Issue 31, item 5: what a reading of the backends found, each checked against transformers' own code
(the installed model classes and processor modules), never against the backend's own assumptions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tone, without_vision
from test_backends import _score, save_tiny_phi4, tiny_granite_dir, tiny_omni_dir  # noqa: F401 (fixtures)
from test_lslm import req

from lmeval_speech.models.lslm import LSLM

# ---------------------------------------------------------------- Phi-4-multimodal: LongRoPE and prefix sharing
LONGROPE_SWITCH = 24  # original_max_position_embeddings of the tiny model (4096 in released checkpoints)


@pytest.fixture(scope="module")
def tiny_phi4_longrope_dir(tmp_path_factory):
    """The tiny Phi-4-multimodal with LongRoPE as released (short factors up to the switch, long past it)."""
    pytest.importorskip("peft")
    path = tmp_path_factory.mktemp("tiny_phi4_longrope")
    save_tiny_phi4(path, speech_lora=False)
    cfg = json.loads((path / "config.json").read_text())
    half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                              "short_factor": [1.0] * half, "long_factor": [1.0 + i for i in range(half)],
                              "original_max_position_embeddings": LONGROPE_SWITCH}
    cfg["original_max_position_embeddings"] = LONGROPE_SWITCH
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def test_phi4_longrope_scores_equal_the_whole_sequence_forward(tiny_phi4_longrope_dir):
    """A context below the LongRoPE switch and a continuation past it: the model's own forward on the whole
    sequence uses the long factors everywhere; a prefix cached with the short factors would not."""
    from transformers import AutoTokenizer, Phi4MultimodalForCausalLM

    path = tiny_phi4_longrope_dir
    tok = AutoTokenizer.from_pretrained(path)
    ctx = "Question: which city is the capital of France and of the"
    conts = [" French Republic, in Europe, for a very long time now? Paris", " Rome"]
    n_ctx = len(tok(ctx)["input_ids"])
    assert n_ctx < LONGROPE_SWITCH < len(tok(ctx + conts[0])["input_ids"])
    model = Phi4MultimodalForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = [_score(tok, lambda ids: model(**ids).logits, ctx, c) for c in conts]
    lm = LSLM(pretrained=path, device="cpu", batch_size=2)
    assert not lm.backend_impl.supports_prefix_cache and lm.batch_size == 1
    got = [ll for ll, _ in lm.loglikelihood([req(ctx, c) for c in conts])]
    np.testing.assert_allclose(got, expected, atol=1e-4)


# ---------------------------------------------------------------- Qwen2.5-Omni: audio token count
OMNI_CLIPS = [11_200, 16_001, 16_159, 16_161, 36_801, 117_679, 479_999, 480_000]


def test_omni_audio_token_count_is_the_processor_modules(tiny_omni_dir):
    """The count ``Qwen2_5OmniProcessor`` writes (its module's ``_get_feat_extract_output_lengths`` on the
    feature extractor's attention mask, as the processor calls it) for short, odd-length and long clips (up to
    the 30 s window of the tiny checkpoint), and the number of embeddings the thinker's encoder gives."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import (
        _get_feat_extract_output_lengths,
    )

    fe = WhisperFeatureExtractor.from_pretrained(tiny_omni_dir)
    b = LSLM(pretrained=tiny_omni_dir, device="cpu").backend_impl
    clips = [tone((n + 0.5) / 16000, seed=n) for n in OMNI_CLIPS]
    assert [len(a) for a in clips] == OMNI_CLIPS
    feats = fe(clips, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    expected = _get_feat_extract_output_lengths(feats["attention_mask"].sum(-1)).tolist()
    assert [b.num_audio_tokens(n) for n in OMNI_CLIPS] == expected
    assert [e.shape[0] for e in b.encode(clips)] == expected


# ---------------------------------------------------------------- Granite Speech: logits_scaling
def test_granite_scores_divide_the_installed_class_logits_by_logits_scaling(tiny_granite_dir):
    """The choice, against the installed ``GraniteSpeechForConditionalGeneration``: its transformers 5 forward
    returns ``lm_head(h)``; the Granite LLM inside was trained, and is served (``GraniteForCausalLM``, vLLM's
    Granite), with ``lm_head(h) / logits_scaling``, and this class's forward did so through transformers 4.x.
    lslm scores with the division: multi-token log-likelihoods equal the installed class's logits divided by
    ``logits_scaling`` and differ from its raw logits (same argmax, so greedy generation is unchanged)."""
    from test_backends import _granite_log_mel_numpy
    from test_lslm import speech_requests
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration

    model = GraniteSpeechForConditionalGeneration.from_pretrained(tiny_granite_dir, dtype=torch.float32).eval()
    scale = model.config.text_config.logits_scaling
    assert scale != 1.0
    tok = AutoTokenizer.from_pretrained(tiny_granite_dir)
    reqs = [r for r in speech_requests((1.0,)) if len(r.args[1].split()) > 1]  # " Madrid and more": 3 tokens
    got = [ll for ll, _ in LSLM(pretrained=tiny_granite_dir, device="cpu").loglikelihood(reqs)]
    ctx, cont, extra = reqs[0].args
    audio = extra["audio"][0]["array"]
    feats = torch.from_numpy(_granite_log_mel_numpy(audio)).float()
    n = (len(audio) // 160 + 1) // 2  # encoder frames; 3 tokens per 15 (GraniteSpeechFeatureExtractor)
    prompt = ctx.replace("<audio>", "<|audio|>" * (math.ceil(n / 15) * 3))

    def logits(ids):
        return model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], input_features=feats).logits

    divided = _score(tok, lambda ids: logits(ids) / scale, prompt, cont)
    raw = _score(tok, logits, prompt, cont)
    np.testing.assert_allclose(got, [divided], atol=1e-4)
    assert abs(raw - divided) > 0.1


# ---------------------------------------------------------------- Qwen3-Omni: its processor and chat template
QWEN3_OMNI_CHAT_TEMPLATE = (  # in the shape of Qwen's omni templates (the released one cannot be downloaded here)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_qwen3_omni_renders_its_processors_chat_template_and_scores_its_call(tmp_path):
    """Without torchvision the backend holds ``Qwen3OmniMoeProcessor`` itself (its audio half): its chat template
    renders the prompt, and the score equals the thinker's forward on the processor's own ``__call__``."""
    import shutil

    from test_backends import save_tiny_qwen3_omni
    from transformers import (
        Qwen3OmniMoeProcessor,
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    path = save_tiny_qwen3_omni(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3OmniMoeProcessor"}))
    (tmp_path / "ckpt" / "chat_template.jinja").write_text(QWEN3_OMNI_CHAT_TEMPLATE)
    lm = LSLM(pretrained=path, device="cpu")
    assert isinstance(lm.backend_impl.processor, Qwen3OmniMoeProcessor)
    speech = lm.apply_chat_template([{"role": "user", "content": "Question: <audio>\nAnswer:"}])
    assert speech == "<|im_start|>user\nQuestion: <audio>\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    audio = tone(2.3, seed=5)
    extra = {"audio": [{"array": audio, "sampling_rate": 16000}]}
    (ll, _), = lm.loglikelihood([req(speech.rstrip(), "\nParis", extra)])
    # the reference: the processor built here by the class's own __init__ with its vision halves left out
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    proc = without_vision(Qwen3OmniMoeProcessor, None, None, WhisperFeatureExtractor.from_pretrained(path),
                          AutoTokenizer.from_pretrained(path), chat_template=QWEN3_OMNI_CHAT_TEMPLATE)
    rendered = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "Question: "}, {"type": "audio"}, {"type": "text", "text": "\nAnswer:"}]}],
        tokenize=False, add_generation_prompt=True)
    assert rendered == speech.replace("<audio>", "<|audio_start|><|audio_pad|><|audio_end|>")
    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    full = proc(text=rendered.rstrip() + "\nParis", audio=[audio], return_tensors="pt")
    n_ctx = proc(text=rendered.rstrip(), audio=[audio], return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**full).logits[0]
    ids = full["input_ids"][0]
    expected = float(torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[n_ctx - 1:, 0].sum())
    assert ll == pytest.approx(expected, abs=1e-4)
    shutil.rmtree(tmp_path / "ckpt")
