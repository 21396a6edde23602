"""Nemotron-H Omni (issue 31) through ``lslm``: a tiny random-weight ``NemotronH_Omni_Reasoning_V3`` (Parakeet sound
encoder, hybrid Mamba-2 / attention / MLP decoder run by transformers' torch path) with its own processor
(``NemotronH_Omni_Reasoning_V3Processor``; without torchvision its audio half) and a chat template, scored against the
processor's ``__call__`` + the model's own forward; no prefix sharing (a Mamba state is not a per-position cache)."""

from __future__ import annotations

import json

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
from test_prefix_cache import cloze_requests, count_calls

from lmeval_speech.models.lslm import LSLM

AUDIO = "<so_embedding>"
# A chat template in the shape of an instruct model's (turns, the processor's audio token once per audio item), written
# here: the released Nemotron Omni template cannot be downloaded where these tests run.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'audio' %}{{ '<so_embedding>' }}{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_nemotron_h_omni(path):
    """Model, tokenizer and the files ``NemotronH_Omni_Reasoning_V3Processor.save_pretrained`` writes for its audio
    half: processor settings with the nested feature extractor, and the chat template."""
    from transformers import (
        NemotronH_Omni_Reasoning_V3,
        NemotronH_Omni_Reasoning_V3_Config,
        ParakeetFeatureExtractor,
    )

    tok = build_tokenizer()
    tok.add_tokens(["<so_start>", "<so_end>", AUDIO, "<image>", "<img>", "</img>"], special_tokens=True)
    ids = tok.convert_tokens_to_ids
    cfg = NemotronH_Omni_Reasoning_V3_Config(
        # Mamba-2, attention, MLP, Mamba-2: every block kind of the hybrid decoder but MoE
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                         n_groups=2, chunk_size=16, conv_kernel=4, num_nextn_predict_layers=0,
                         layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=16, image_size=64,
                           max_img_size=64, video_temporal_patch_size=2),
        audio_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          num_mel_bins=80, subsampling_factor=8, subsampling_conv_channels=8,
                          projection_hidden_size=48, projection_bias=False),
        vision_hidden_size=32, projector_hidden_size=48, image_token_id=ids("<image>"), audio_token_id=ids(AUDIO))
    torch.manual_seed(0)
    model = NemotronH_Omni_Reasoning_V3(cfg)
    with torch.no_grad():  # larger random weights than the initializer's 0.02, so that scores differ between clips
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "NemotronH_Omni_Reasoning_V3Processor", "audio_subsampling_factor": 8,
        "feature_extractor": ParakeetFeatureExtractor().to_dict()}, default=str))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return str(path)


@pytest.fixture(scope="session")
def tiny_nemotron_dir(tmp_path_factory):
    return save_tiny_nemotron_h_omni(tmp_path_factory.mktemp("tiny_nemotron_h_omni"))


def _nemotron(path):
    """The model as transformers loads it and its processor built here from the checkpoint's files, the image and
    video processors left out by monkeypatching the class's argument check (the backend's loader is not used)."""
    from pathlib import Path

    from transformers import (
        AutoFeatureExtractor,
        AutoTokenizer,
        NemotronH_Omni_Reasoning_V3,
        NemotronH_Omni_Reasoning_V3Processor,
    )

    cls = NemotronH_Omni_Reasoning_V3Processor
    model = NemotronH_Omni_Reasoning_V3.from_pretrained(path, dtype=torch.float32).eval()
    proc = without_vision(cls, None, None, AutoTokenizer.from_pretrained(path), AutoFeatureExtractor.from_pretrained(path),
                          chat_template=Path(path, "chat_template.jinja").read_text(), audio_subsampling_factor=8)
    return model, proc


def nemotron_reference(path, reqs, **call):
    model, proc = _nemotron(path)
    return processor_reference(model, proc, reqs, AUDIO, **call)


def test_nemotron_h_omni_loglikelihood_matches_the_processor_and_model(tiny_nemotron_dir):
    from lmeval_speech.models.backends.nemotron_h_omni import NemotronHOmniBackend

    lm = check_parity(tiny_nemotron_dir, speech_requests((1.0, 2.3, 0.7)), nemotron_reference)
    assert type(lm.backend_impl) is NemotronHOmniBackend
    assert [s.n_tokens for s in lm.audio.status.values()] == [13, 29, 9]  # 80 ms a token


@pytest.mark.parametrize("samples", [1, 159, 1_281, 16_001, 16_161, 36_799])
def test_nemotron_h_omni_audio_token_count_is_the_processors(tiny_nemotron_dir, samples):
    """The count the processor's ``__call__`` writes, and the encoder's output length, for odd lengths."""
    model, proc = _nemotron(tiny_nemotron_dir)
    audio = tone((samples + 0.5) / 16000, seed=samples)
    inputs = proc(text=f"Q: {AUDIO}", audio=[audio], return_tensors="pt")
    n = int((inputs["input_ids"][0] == model.config.audio_token_id).sum())
    b = LSLM(pretrained=tiny_nemotron_dir, device="cpu").backend_impl
    assert b.num_audio_tokens(samples) == n
    if samples < 400:  # a clip of one or two mel frames: the extractor's per-clip normalization gives NaN
        return
    with torch.no_grad():
        own = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    torch.testing.assert_close(b.encode([audio])[0], own)


def test_nemotron_h_omni_has_no_prefix_sharing_and_scores_whole_sequences(tiny_nemotron_dir):
    """A Mamba cache is one recurrent state per row, not a cache to cut per row: every choice runs whole, with the
    numbers of ``prefix_cache=False``, whatever the batch."""
    lm = LSLM(pretrained=tiny_nemotron_dir, device="cpu", batch_size=3)
    assert not lm.backend_impl.supports_prefix_cache
    calls = count_calls(lm)
    reqs = cloze_requests(n_items=1)
    got = lm.loglikelihood(reqs)
    assert calls["continuation"] == 0 and calls["prefix"] == -(-8 // 3)  # 8 distinct sequences
    expected = LSLM(pretrained=tiny_nemotron_dir, device="cpu", batch_size=1, prefix_cache=False).loglikelihood(reqs)
    np.testing.assert_allclose([g for g, _ in got], [e for e, _ in expected], atol=1e-4)
    with pytest.raises(NotImplementedError, match="Mamba"):
        lm.backend_impl.run_decoder(torch.zeros(1, 2, 64), torch.ones(1, 2, dtype=torch.long), None, use_cache=True)


def test_nemotron_h_omni_text_twin_matches_the_model(tiny_nemotron_dir):
    model, proc = _nemotron(tiny_nemotron_dir)
    check_text_twin(tiny_nemotron_dir, model, proc.tokenizer, "A. Paris B. Rome<so_end>")


def test_nemotron_h_omni_captures_speech_and_text_states(tiny_nemotron_dir, tmp_path):
    model, proc = _nemotron(tiny_nemotron_dir)
    check_capture(tiny_nemotron_dir, tmp_path, processor_hidden_states(model, proc, AUDIO))


def test_nemotron_h_omni_interventions_are_exact_and_local(tiny_nemotron_dir):
    check_interventions(tiny_nemotron_dir)


def test_nemotron_h_omni_chat_template_is_the_processors(tiny_nemotron_dir):
    model, proc = _nemotron(tiny_nemotron_dir)
    lm = LSLM(pretrained=tiny_nemotron_dir, device="cpu", batch_size=2)
    desc = "The following are questions (with answers) about geography."
    speech = lm.apply_chat_template([{"role": "system", "content": desc},
                                     {"role": "user", "content": "Question: <audio>\nAnswer:"}])
    expected = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": f"{desc}\n\nQuestion: "}, {"type": "audio"},
                                      {"type": "text", "text": "\nAnswer:"}]}], tokenize=False, add_generation_prompt=True)
    assert speech == expected.replace(AUDIO, "<audio>")
    extra = {"audio": [{"array": tone(1.2, seed=5), "sampling_rate": 16000}]}
    (ll, _), = lm.loglikelihood([req(speech, "Paris", extra)])
    moved = [req(speech.rstrip(), speech[len(speech.rstrip()):] + "Paris", extra)]  # lm-eval's trailing-space move
    np.testing.assert_allclose(ll, nemotron_reference(tiny_nemotron_dir, moved)[0][0], atol=1e-4)


def test_nemotron_h_omni_full_processor_agrees_with_its_audio_half(tiny_nemotron_dir):
    """Where torchvision imports (a GPU user's machine): the whole processor and the audio half give the same ids,
    features and chat rendering."""
    pytest.importorskip("torchvision")
    from transformers import NemotronH_Omni_Reasoning_V3Processor

    from lmeval_speech.models.backends.processor_half import load_processor

    full = load_processor(NemotronH_Omni_Reasoning_V3Processor, tiny_nemotron_dir, full=True)
    half = load_processor(NemotronH_Omni_Reasoning_V3Processor, tiny_nemotron_dir, full=False)
    audio = tone(2.3, seed=1)
    a, b = (p(text=f"Q: {AUDIO}", audio=[audio], return_tensors="pt") for p in (full, half))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_features"], b["input_features"])
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Q"}]}]
    assert full.apply_chat_template(chat, tokenize=False) == half.apply_chat_template(chat, tokenize=False)


@pytest.mark.slow  # ~3 s: transformers' generate loop over the torch Mamba path
def test_nemotron_h_omni_generation_is_the_models(tiny_nemotron_dir):
    """Greedy ``generate_until`` (speech embeddings in, the Mamba + attention cache of transformers' ``generate``)
    decodes what the model's own ``generate`` on the processor's output decodes."""
    model, proc = _nemotron(tiny_nemotron_dir)
    lm = LSLM(pretrained=tiny_nemotron_dir, device="cpu", batch_size=2)
    audio = tone(1.2, seed=5)
    prompt = "Question: <audio>\nAnswer:"
    kw = {"until": ["<never>"], "max_gen_toks": 4, "do_sample": False}
    texts = ["Question: What is the capital of France?\nAnswer:"]
    got = lm.generate_until([req(prompt, kw, {"audio": [{"array": audio, "sampling_rate": 16000}]},
                                 kind="generate_until")] + [req(t, kw, kind="generate_until") for t in texts])
    inputs = proc(text=prompt.replace("<audio>", AUDIO), audio=[audio], return_tensors="pt")
    expected = [model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]]
    for t in texts:
        ids = proc.tokenizer(t, return_tensors="pt")
        expected.append(model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert got == [proc.tokenizer.decode(e, skip_special_tokens=True) for e in expected]
