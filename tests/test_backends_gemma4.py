"""Gemma 4 (issue 31) through ``lslm``: a tiny random-weight ``Gemma4ForConditionalGeneration`` with its own
processor (``Gemma4Processor``; without torchvision its audio half, the same class without image and video
processors) and chat template, scored against the processor's ``__call__`` + the model's own forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tokenizer, tone, without_vision
from test_backends import (
    check_capture,
    check_interventions,
    check_parity,
    check_text_twin,
    processor_hidden_states,
    processor_reference,
)
from test_lslm import req, speech_requests

from lmeval_speech.models.lslm import LSLM

# A chat template in the shape of Gemma's (turns, one audio token per audio item, trimmed text), written here: the
# released Gemma 4 template cannot be downloaded where these tests run.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' %}{{ '<|audio|>' }}{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
AUDIO = "<|audio|>"


def gemma4_tokenizer():
    """The test BPE with Gemma 4's multimodal tokens and their tokenizer attributes; BOS added, as Gemma's."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer()
    base.add_tokens(["<|audio>", "<audio|>", AUDIO, "<|image>", "<image|>", "<|image|>", "<|video|>",
                     "<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    backend = base.backend_tokenizer
    bos = base.convert_tokens_to_ids("<|im_start|>")
    backend.post_processor = TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                special_tokens=[("<|im_start|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", extra_special_tokens={
            "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": AUDIO, "boi_token": "<|image>",
            "eoi_token": "<image|>", "image_token": "<|image|>", "video_token": "<|video|>"})


def save_tiny_gemma4(path):
    """Model, tokenizer and the files ``Gemma4Processor.save_pretrained`` writes for its audio half: processor
    settings with the nested feature extractor, and the chat template (its image/video halves need torchvision)."""
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
    )

    tok = gemma4_tokenizer()
    ids = tok.convert_tokens_to_ids
    # 6 layers, the last 2 reusing earlier layers' K/V (as released models do; Gemma normalizes q, k and v, so a
    # length edit reaches the score only through later layers with their own K/V); bidirectional attention over
    # images only, as released configs: audio stays causal
    cfg = Gemma4Config(
        text_config=dict(vocab_size=len(tok), vocab_size_per_layer_input=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         hidden_size_per_layer_input=8, layer_types=["sliding_attention", "full_attention"] * 3,
                         sliding_window=64, num_kv_shared_layers=2, max_position_embeddings=4096,
                         use_bidirectional_attention="vision", pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, final_logit_softcapping=5.0),
        vision_config=None,
        audio_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 8],
                          output_proj_dims=32),
        audio_token_id=ids(AUDIO), boa_token_id=ids("<|audio>"), eoa_token_index=ids("<audio|>"),
        image_token_id=ids("<|image|>"), boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"),
        video_token_id=ids("<|video|>"))
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(cfg)
    with torch.no_grad():  # zero-initialized scales (they gate the per-layer inputs)
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor", "audio_seq_length": 750, "audio_ms_per_token": 40,
        "image_seq_length": 280, "feature_extractor": Gemma4AudioFeatureExtractor().to_dict()}, default=str))
    (path / "chat_template.jinja").write_text(GEMMA4_CHAT_TEMPLATE)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gemma4_dir(tmp_path_factory):
    return save_tiny_gemma4(tmp_path_factory.mktemp("tiny_gemma4"))


def _gemma4(path):
    """The model as transformers loads it and ``Gemma4Processor`` built here from the checkpoint's files, its image
    and video processors left out by monkeypatching the class's argument check (the backend's loader is not used)."""
    from transformers import (
        AutoFeatureExtractor,
        AutoTokenizer,
        Gemma4ForConditionalGeneration,
        Gemma4Processor,
    )

    model = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    settings = json.loads(Path(path, "processor_config.json").read_text())
    proc = without_vision(Gemma4Processor, AutoFeatureExtractor.from_pretrained(path), None,
                          AutoTokenizer.from_pretrained(path), None,
                          chat_template=Path(path, "chat_template.jinja").read_text(),
                          audio_seq_length=settings["audio_seq_length"])
    return model, proc


def gemma4_reference(path, reqs, **call):
    model, proc = _gemma4(path)
    return processor_reference(model, proc, reqs, AUDIO, **call)


def test_gemma4_loglikelihood_matches_the_processor_and_model(tiny_gemma4_dir):
    from lmeval_speech.models.backends.gemma4 import Gemma4Backend

    lm = check_parity(tiny_gemma4_dir, speech_requests((1.0, 2.3, 0.7)), gemma4_reference)
    assert type(lm.backend_impl) is Gemma4Backend
    assert [s.n_tokens for s in lm.audio.status.values()] == [25, 58, 18]  # 40 ms a token
    assert lm.tok_encode("Question:")[0] == lm.tokenizer.bos_token_id


@pytest.mark.parametrize("samples", [1, 401, 16_001, 16_161, 36_799, 479_999])
def test_gemma4_audio_token_count_is_the_processors(tiny_gemma4_dir, samples):
    """The count the processor's ``__call__`` writes (from the feature extractor's mask), for odd lengths."""
    model, proc = _gemma4(tiny_gemma4_dir)
    audio = tone((samples + 0.5) / 16000, seed=samples)
    ids = proc(text=f"Q: {AUDIO}", audio=[audio], return_tensors="pt")["input_ids"][0]
    b = LSLM(pretrained=tiny_gemma4_dir, device="cpu").backend_impl
    assert b.num_audio_tokens(samples) == int((ids == model.config.audio_token_id).sum())
    if samples > 400:
        assert b.encode([audio])[0].shape[0] == b.num_audio_tokens(samples)


def test_gemma4_text_twin_matches_the_model(tiny_gemma4_dir):
    model, proc = _gemma4(tiny_gemma4_dir)
    check_text_twin(tiny_gemma4_dir, model, proc.tokenizer, "A. Paris B. Rome<audio|>")


def test_gemma4_captures_speech_and_text_states(tiny_gemma4_dir, tmp_path):
    model, proc = _gemma4(tiny_gemma4_dir)
    check_capture(tiny_gemma4_dir, tmp_path, processor_hidden_states(model, proc, AUDIO))


def test_gemma4_interventions_are_exact_and_local(tiny_gemma4_dir):
    check_interventions(tiny_gemma4_dir)


@pytest.mark.slow
def test_gemma4_45_second_clip_is_cut_at_30_s_as_its_extractor_cuts_and_flagged(tiny_gemma4_dir):
    clip = tone(45.0, seed=9)
    reqs = speech_requests((45.0,))
    for r in reqs:
        r.arguments[2]["audio"][0]["array"] = clip
    lm = check_parity(tiny_gemma4_dir, reqs, gemma4_reference)  # the processor cuts at 30 s too
    (status,) = lm.audio.status.values()
    assert status.truncated and status.notes["seconds"] == 30.0 and status.n_tokens == 750


def test_gemma4_chat_template_and_generation(tiny_gemma4_dir):
    model, proc = _gemma4(tiny_gemma4_dir)
    lm = LSLM(pretrained=tiny_gemma4_dir, device="cpu", batch_size=2)
    desc = "The following are questions (with answers) about geography."
    speech = lm.apply_chat_template([{"role": "system", "content": desc},
                                     {"role": "user", "content": "Question: <audio>\nAnswer:"}])
    expected = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": f"{desc}\n\nQuestion: "}, {"type": "audio"},
                                      {"type": "text", "text": "\nAnswer:"}]}], tokenize=False, add_generation_prompt=True)
    assert speech == expected.replace(AUDIO, "<audio>")
    audio = tone(1.2, seed=5)
    extra = {"audio": [{"array": audio, "sampling_rate": 16000}]}
    (ll, _), = lm.loglikelihood([req(speech, "Paris", extra)])
    moved = [req(speech.rstrip(), speech[len(speech.rstrip()):] + "Paris", extra)]
    np.testing.assert_allclose(ll, gemma4_reference(tiny_gemma4_dir, moved, add_special_tokens=False)[0][0], atol=1e-4)
    kw = {"until": ["<|im_end|>"], "max_gen_toks": 5, "do_sample": False}
    texts = ["Question: What is the capital of France?\nAnswer:", "the quick"]
    got = lm.generate_until([req(speech, kw, extra, kind="generate_until")] + [req(t, kw, kind="generate_until")
                                                                               for t in texts])
    inputs = proc(text=speech.replace("<audio>", AUDIO), audio=[audio], return_tensors="pt", add_special_tokens=False)
    expected = [model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]]
    for t in texts:
        ids = proc.tokenizer(t, return_tensors="pt")
        expected.append(model.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert got == [proc.tokenizer.decode(e, skip_special_tokens=True) for e in expected]


def test_gemma4_full_processor_agrees_with_its_audio_half(tiny_gemma4_dir):
    """Where torchvision imports (a GPU user's machine): the whole processor and the audio half give the same ids,
    features and chat rendering."""
    pytest.importorskip("torchvision")
    from transformers import Gemma4Processor

    from lmeval_speech.models.backends.processor_half import load_processor

    full = load_processor(Gemma4Processor, tiny_gemma4_dir, full=True)
    half = load_processor(Gemma4Processor, tiny_gemma4_dir, full=False)
    audio = tone(2.3, seed=1)
    a, b = (p(text=f"Q: {AUDIO}", audio=[audio], return_tensors="pt") for p in (full, half))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_features"], b["input_features"])
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Q"}]}]
    assert full.apply_chat_template(chat, tokenize=False) == half.apply_chat_template(chat, tokenize=False)
