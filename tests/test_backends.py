"""Qwen2.5-Omni (thinker), Voxtral and Granite Speech through ``lslm``: tiny random-weight instances of the
real transformers classes, saved and loaded back with ``pretrained=DIR``, scored against a direct forward
of the same class on ids and features built independently of the backend."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import OMNI_TOKENS, build_tokenizer, multimodal_tokenizer, tone
from lmeval_speech.models.lslm import LSLM
from test_lslm import req, speech_requests

CHOICES = 3  # speech_requests(): 3 continuations per clip


def _text_config(tok, **extra):
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)


def _omni_thinker(tok):
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    cfg = Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, output_dim=64),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        text_config=_text_config(tok, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                       "mrope_section": [2, 3, 3]}),  # sums to head_dim / 2
        audio_token_index=ids("<|AUDIO|>"), audio_start_token_id=ids("<|audio_bos|>"),
        audio_end_token_id=ids("<|audio_eos|>"), vision_start_token_id=ids("<|AUDIO_START|>"),
        vision_end_token_id=ids("<|AUDIO_END|>"),
    )
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg)


@pytest.fixture(scope="session")
def tiny_omni_dir(tmp_path_factory):
    """With the multimodal token names ``Qwen2_5OmniProcessor`` reads from the tokenizer; no processor chat
    template (the tokenizer's is used), as before."""
    from transformers import WhisperFeatureExtractor

    tokenizer = multimodal_tokenizer(OMNI_TOKENS)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2_5_omni_thinker")
    _omni_thinker(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_omni_full_dir(tmp_path_factory, tiny_omni_dir):
    """A whole ``qwen2_5_omni`` checkpoint (weights under ``thinker.``) holding the thinker above."""
    from transformers import (AutoTokenizer, Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration,
                              Qwen2_5OmniThinkerForConditionalGeneration, WhisperFeatureExtractor)

    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_omni_dir)
    full = Qwen2_5OmniForConditionalGeneration(
        Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict(), enable_audio_output=False))
    full.thinker.load_state_dict(thinker.state_dict())
    path = tmp_path_factory.mktemp("tiny_qwen2_5_omni")
    full.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_omni_dir).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_voxtral_dir(tmp_path_factory, tokenizer):
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

    torch.manual_seed(0)
    cfg = VoxtralConfig(
        audio_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_mel_bins=128, max_source_positions=1500),  # intermediate = 4 x hidden: 4 frames/token
        text_config=dict(model_type="llama", head_dim=16, **_text_config(tokenizer)),
        audio_token_id=tokenizer.convert_tokens_to_ids("[AUDIO]"),
    )
    path = tmp_path_factory.mktemp("tiny_voxtral")
    VoxtralForConditionalGeneration(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(path)
    return str(path)


GRANITE_FE = {  # what GraniteSpeechFeatureExtractor().to_dict() holds (building one needs torchaudio)
    "feature_extractor_type": "GraniteSpeechFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
    "padding_value": 0.0, "padding_side": "right", "return_attention_mask": True,
    "melspec_kwargs": {"sample_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80},
    "projector_window_size": 15, "projector_downsample_rate": 5,
}


@pytest.fixture(scope="session")
def tiny_granite_dir(tmp_path_factory, tokenizer):
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    torch.manual_seed(0)
    cfg = GraniteSpeechConfig(
        text_config=dict(model_type="granite", embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5,
                         attention_multiplier=0.25, **_text_config(tokenizer)),
        encoder_config=dict(input_dim=160, hidden_dim=64, num_layers=2, num_heads=4, output_dim=42,
                            context_size=200, max_pos_emb=512, conv_kernel_size=15),
        projector_config=dict(model_type="blip_2_qformer", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, encoder_hidden_size=64, cross_attention_frequency=1),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"), has_lora_adapter=False,
    )
    path = tmp_path_factory.mktemp("tiny_granite_speech")
    GraniteSpeechForConditionalGeneration(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(GRANITE_FE))
    return str(path)


# ---------------------------------------------------------------- independent references
def _score(tok, model_logits, prompt, cont):
    """Log-likelihood of ``cont`` after ``prompt`` from full-sequence logits, ``model(**inputs)``-style."""
    ids = tok(prompt + cont, return_tensors="pt")
    n_ctx = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logits = model_logits(ids).float()[0]
    target = ids["input_ids"][0]
    logp = torch.log_softmax(logits[:-1], -1).gather(1, target[1:, None])[:, 0]
    return float(logp[n_ctx - 1:].sum())


def omni_reference(path, reqs):
    from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration, WhisperFeatureExtractor
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok, fe = AutoTokenizer.from_pretrained(path), WhisperFeatureExtractor.from_pretrained(path)
    out = []
    for r in reqs:
        ctx, cont, extra = r.args
        # Qwen2_5OmniProcessor._process_audio: max_length padding, attention mask, its own token count
        feats = fe([extra["audio"][0]["array"]], sampling_rate=16000, padding="max_length",
                   return_attention_mask=True, return_tensors="pt")
        n = int(_get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))[0])
        prompt = ctx.replace("<audio>", "<|audio_bos|>" + "<|AUDIO|>" * n + "<|audio_eos|>")
        out.append(_score(tok, lambda ids: model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                                 input_features=feats["input_features"],
                                                 feature_attention_mask=feats["attention_mask"]).logits, prompt, cont))
    return out


def voxtral_reference(path, reqs):
    from transformers import AutoTokenizer, VoxtralForConditionalGeneration, VoxtralProcessor, WhisperFeatureExtractor

    model = VoxtralForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    proc = VoxtralProcessor(feature_extractor=WhisperFeatureExtractor.from_pretrained(path), tokenizer=tok)
    out = []
    for r in reqs:
        ctx, cont, extra = r.args
        audio = extra["audio"][0]["array"]
        feats = proc._retrieve_input_features(  # the processor's own audio path, with its default audio kwargs
            [audio], 3000, sampling_rate=16000, padding=True, truncation=False, pad_to_multiple_of=480000,
            return_tensors="pt")
        # the count the model itself takes for the processor's features (its forward requires one placeholder per
        # audio embedding), not the backend's rule; mistral-common (not installed here) counts 12.5 tokens a second
        with torch.no_grad():
            n = model.get_audio_features(feats).pooler_output.shape[0]
        assert n == math.ceil(math.ceil(len(audio) / 480000) * 480000 / 160 / 8)
        prompt = tok.bos_token + ctx.replace("<audio>", "[BEGIN_AUDIO]" + "[AUDIO]" * n)  # mistral-common's <s>
        out.append(_score(tok, lambda ids: model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                                 input_features=feats).logits, prompt, cont))
    return out


def granite_reference(path, reqs):
    from transformers import AutoTokenizer, GraniteSpeechFeatureExtractor, GraniteSpeechForConditionalGeneration

    model = GraniteSpeechForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    fe_settings = SimpleNamespace(melspec_kwargs={"hop_length": 160}, projector_window_size=15,
                                  projector_downsample_rate=5)
    out = []
    for r in reqs:
        ctx, cont, extra = r.args
        audio = extra["audio"][0]["array"]
        # transformers' numpy audio utilities, not the backend's torch log-mel (the real extractor needs torchaudio)
        feats = torch.from_numpy(_granite_log_mel_numpy(audio)).float()
        n = GraniteSpeechFeatureExtractor._get_num_audio_features(fe_settings, [len(audio)])[0]
        prompt = ctx.replace("<audio>", "<|audio|>" * n)
        # transformers 5's GraniteSpeechForConditionalGeneration returns lm_head(h) without the Granite head's
        # division by logits_scaling, which the Granite LLM was trained with (GraniteForCausalLM, IBM's own
        # training stack, vLLM) and which this model's forward applied through transformers 4.x: the choice is
        # pinned in test_backends_fixes.test_granite_scores_divide_the_installed_class_logits_by_logits_scaling
        scale = model.config.text_config.logits_scaling
        out.append(_score(tok, lambda ids: model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                                 input_features=feats).logits / scale, prompt, cont))
    return out


CASES = {  # fixture, reference, clip lengths (Voxtral: one clip over 30 s -> two windows)
    "qwen2_5_omni": ("tiny_omni_dir", omni_reference, (1.0, 2.3, 0.7)),
    "voxtral": ("tiny_voxtral_dir", voxtral_reference, (1.0, 31.0, 0.7)),
    "granite_speech": ("tiny_granite_dir", granite_reference, (1.0, 2.3, 0.7)),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_loglikelihood_matches_direct_forward(family, request):
    fixture, reference, seconds = CASES[family]
    path = request.getfixturevalue(fixture)
    reqs = speech_requests(seconds)
    lm = LSLM(pretrained=path, device="cpu", batch_size=4)
    from lmeval_speech.models.backends import SPEECH_BACKENDS

    assert SPEECH_BACKENDS[family].endswith(":" + type(lm.backend_impl).__name__)
    got = [ll for ll, _ in lm.loglikelihood(reqs)]
    expected = reference(path, reqs)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    per_clip = np.array(got).reshape(len(seconds), CHOICES)
    assert (np.ptp(per_clip, axis=0) > 1e-5).all()  # the audio changes each continuation's score
    one = [ll for ll, _ in LSLM(pretrained=path, device="cpu", batch_size=1).loglikelihood(reqs)]
    np.testing.assert_allclose(one, got, atol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_omni_dir", "tiny_voxtral_dir", "tiny_granite_dir", "tiny_af3_dir", "tiny_gemma3n_dir", "tiny_qwen3_omni_dir", "tiny_phi4_dir"])
def test_generate_until_with_audio(fixture, request):
    lm = LSLM(pretrained=request.getfixturevalue(fixture), device="cpu")
    audio = {"audio": [{"array": tone(1.0), "sampling_rate": 16000}]}
    out = lm.generate_until([req("Question: <audio>\nAnswer:", {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
                                 audio, kind="generate_until")])
    # no failure mark (a failed item is an empty string marked failed), and the stop string cuts the same greedy
    # decode where it first appears (the decode itself is checked against transformers' generate in test_trust
    # for Qwen2-Audio and in the Gemma 3n / Gemma 4 chat-template tests)
    free = lm.generate_until([req("Question: <audio>\nAnswer:", {"until": ["<never>"], "max_gen_toks": 4,
                                                                 "do_sample": False}, audio, kind="generate_until")])
    assert not getattr(out[0], "failed", "") and not getattr(free[0], "failed", "")
    assert "\n" not in out[0] and free[0].split("\n")[0] == out[0]


def test_full_qwen2_5_omni_checkpoint_loads_its_thinker(tiny_omni_dir, tiny_omni_full_dir):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    lm = LSLM(pretrained=tiny_omni_full_dir, device="cpu", batch_size=4)
    assert isinstance(lm.model, Qwen2_5OmniThinkerForConditionalGeneration)
    reqs = speech_requests((1.0, 0.7))
    thinker = LSLM(pretrained=tiny_omni_dir, device="cpu", batch_size=4).loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in lm.loglikelihood(reqs)], [x for x, _ in thinker], atol=1e-5)


def test_omni_position_ids_follow_the_thinker(tiny_omni_dir):
    """run_decoder's positions are the thinker's own (``compute_3d_position_ids``) for a padded batch."""
    lm = LSLM(pretrained=tiny_omni_dir, device="cpu")
    b = lm.backend_impl
    a = b.audio_token_id
    ids = torch.tensor([[11, 3] + [a] * 5 + [5, 12, 13], [11, 3] + [a] * 2 + [5, 12, 0, 0, 0, 0]])
    mask = (torch.arange(10) < torch.tensor([[10], [6]])).long()
    captured = {}
    real = b.decoder.forward
    b.decoder.forward = lambda **kw: captured.update(kw) or real(**kw)
    b.run_decoder(b.embed_tokens(ids), mask, ids)
    thinker = b.model.model
    thinker.rope_deltas = None
    expected = thinker.compute_3d_position_ids(ids, None, None, b.embed_tokens(ids), mask, None,
                                               audio_feature_lengths=torch.tensor([20, 8]))
    assert torch.equal(captured["position_ids"], expected)


def test_voxtral_control_tokens_written_as_text(tiny_voxtral_dir, tmp_path):
    """A tokenizer that encodes ``[AUDIO]`` in text as plain text (Mistral's Tekken does) gives the same scores."""
    import shutil

    from transformers import AutoTokenizer

    from lmeval_speech.models.backends.voxtral import _ControlTokenText

    shutil.copytree(tiny_voxtral_dir, tmp_path, dirs_exist_ok=True)
    literal = AutoTokenizer.from_pretrained(tiny_voxtral_dir, split_special_tokens=True)
    assert literal.convert_tokens_to_ids("[AUDIO]") not in literal.encode("[AUDIO]")
    literal.save_pretrained(tmp_path)
    lm = LSLM(pretrained=str(tmp_path), device="cpu", batch_size=4)
    assert isinstance(lm.tokenizer, _ControlTokenText)
    reqs = speech_requests((1.0, 0.7))
    expected = LSLM(pretrained=tiny_voxtral_dir, device="cpu", batch_size=4).loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in lm.loglikelihood(reqs)], [x for x, _ in expected], atol=1e-5)


def test_voxtral_audio_tokens_are_whole_windows(tiny_voxtral_dir):
    b = LSLM(pretrained=tiny_voxtral_dir, device="cpu").backend_impl
    assert [b.num_audio_tokens(n) for n in (1, 480000, 480001, 960000)] == [375, 375, 750, 750]
    assert [e.shape[0] for e in b.encode_audio([tone(0.5), tone(30.5)])] == [375, 750]


def _granite_log_mel_numpy(audio):
    """The same features from transformers' numpy audio utilities (float64 STFT, HTK filters)."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    filters = mel_filter_bank(num_frequency_bins=257, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
                              sampling_rate=16000, norm=None, mel_scale="htk")
    mel = spectrogram(audio.astype(np.float64), window_function(400, "hann", frame_length=512), frame_length=512,
                      hop_length=160, fft_length=512, power=2.0, center=True, pad_mode="reflect", mel_filters=filters)
    logmel = np.log10(np.maximum(mel.T, 1e-10))
    logmel = np.maximum(logmel, logmel.max() - 8.0) / 4 + 1
    logmel = logmel[: logmel.shape[0] // 2 * 2]
    return logmel.reshape(1, -1, 160)


@pytest.mark.parametrize("seconds", [0.7, 2.3])
def test_granite_log_mel_matches_an_independent_implementation(seconds):
    from lmeval_speech.models.backends.granite_speech import granite_log_mel

    audio = tone(seconds, seed=3)
    ours = granite_log_mel(audio).numpy()
    ref = _granite_log_mel_numpy(audio)
    assert ours.shape == ref.shape == (1, (len(audio) // 160 + 1) // 2, 160)
    np.testing.assert_allclose(ours, ref, atol=1e-4)  # float32 vs float64: ~2e-5


def test_granite_log_mel_matches_the_real_extractor():
    pytest.importorskip("torchaudio")
    from transformers import GraniteSpeechFeatureExtractor

    from lmeval_speech.models.backends.granite_speech import granite_log_mel

    audio = tone(2.3, seed=3)
    real = GraniteSpeechFeatureExtractor()(torch.from_numpy(audio))["input_features"]
    assert torch.equal(granite_log_mel(audio), real)


def test_granite_head_and_embeddings_follow_the_granite_lm(tiny_granite_dir):
    """Text-only: the backend's embed -> decoder -> logits equals GraniteForCausalLM with the same weights."""
    from transformers import GraniteForCausalLM

    b = LSLM(pretrained=tiny_granite_dir, device="cpu").backend_impl
    lm = GraniteForCausalLM(b.model.config.text_config).eval()
    lm.model.load_state_dict(b.decoder.state_dict())
    lm.lm_head.load_state_dict(b.model.lm_head.state_dict())
    ids = build_tokenizer()("the quick brown fox", return_tensors="pt")
    with torch.no_grad():
        expected = lm(**ids).logits
        hidden = b.run_decoder(b.embed_tokens(ids["input_ids"]), ids["attention_mask"], ids["input_ids"]).last_hidden
        torch.testing.assert_close(b.logits(hidden), expected)


def test_a_45_second_clip_is_never_cut(tiny_qwen2_audio_dir, tiny_voxtral_dir, tiny_granite_dir):
    """45 s of audio (a long spoken MMLU item): every backend keeps all of it. Qwen2-Audio: two encoder
    windows (30 s + 15 s) whose token counts are what its real processor gives each window; Voxtral:
    two 30 s chunks, as its processor pads; Granite: the whole clip, scored as a direct forward."""
    from transformers import AutoProcessor

    clip = tone(45.0, seed=9)
    reqs = speech_requests((45.0,))
    for r in reqs:
        r.arguments[2]["audio"][0]["array"] = clip
    proc = AutoProcessor.from_pretrained(tiny_qwen2_audio_dir)
    expected = 0
    for seg in (clip[:480000], clip[480000:]):
        ids = proc(text="<|audio_bos|><|AUDIO|><|audio_eos|>", audio=[seg], return_tensors="pt")["input_ids"][0]
        expected += int((ids == proc.tokenizer.convert_tokens_to_ids("<|AUDIO|>")).sum())
    for path in (tiny_qwen2_audio_dir, tiny_voxtral_dir, tiny_granite_dir):
        lm = LSLM(pretrained=path, device="cpu")
        res = lm.loglikelihood(reqs)
        assert all(np.isfinite(r[0]) and not getattr(r[0], "truncated", "") for r in res), path
        (status,) = lm.audio.status.values()
        assert status.notes["seconds"] == 45.0 and not status.truncated
        assert status.notes.get("encoder_windows") == (2 if path == tiny_qwen2_audio_dir else None)  # recorded per item
        if path == tiny_qwen2_audio_dir:
            assert status.n_tokens == expected == 750 + 375
        elif path == tiny_voxtral_dir:
            assert status.n_tokens == 750
        else:
            np.testing.assert_allclose([r[0] for r in res], granite_reference(path, reqs), atol=1e-4)


def test_every_voxtral_prompt_starts_with_bos(tiny_voxtral_dir):
    """Mistral's tokenizer starts every prompt with <s>; the tiny Voxtral's tokenizer adds none by itself."""
    lm = LSLM(pretrained=tiny_voxtral_dir, device="cpu")
    bos = lm.tokenizer.bos_token_id
    assert lm.tokenizer.encode("Question:", add_special_tokens=True)[0] != bos  # so lslm must add it
    seen = []
    real = lm.backend_impl.run_decoder
    lm.backend_impl.run_decoder = lambda embeds, mask, ids, **k: seen.append(ids) or real(embeds, mask, ids, **k)
    lm.loglikelihood(speech_requests((1.0,)) + [req("Question: What is the capital of France?\nAnswer:", " Paris")])
    assert seen and all(int(row[0]) == bos for ids in seen for row in ids)
    assert lm.tok_encode("x")[0] == bos and lm.tok_encode(lm.tokenizer.bos_token + "x").count(bos) == 1


def test_a_tekken_checkpoint_without_mistral_common_names_the_extra(tiny_voxtral_dir, tmp_path, monkeypatch):
    import importlib.util
    import shutil

    path = tmp_path / "voxtral_tekken"
    shutil.copytree(tiny_voxtral_dir, path)
    (path / "tekken.json").write_text("{}")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mistral_common" else real(name, *a))
    with pytest.raises(ImportError, match=r"lmeval-speech\[voxtral\]"):
        LSLM(pretrained=str(path), device="cpu")


@pytest.fixture(scope="module")
def tiny_granite_lora_dirs(tmp_path_factory, tiny_granite_dir):
    """The tiny Granite Speech with a random speech LoRA saved as released checkpoints carry it
    (adapter_config.json + adapter_model.safetensors next to the base weights), and its base."""
    pytest.importorskip("peft")
    import shutil

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file
    from transformers import GraniteSpeechForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny_granite_lora")
    shutil.copytree(tiny_granite_dir, path, dirs_exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["has_lora_adapter"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    model = GraniteSpeechForConditionalGeneration.from_pretrained(path)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(lora, model)  # peft's layer API (transformers 5.24's add_adapter wants peft >= 0.22)
    lora.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(path / "adapter_model.safetensors"))
    return str(path), tiny_granite_dir


def test_granite_speech_lora_is_on_for_audio_only(tiny_granite_lora_dirs):
    """Text log-likelihoods equal the base model's; speech ones equal the LoRA model's (a direct forward
    with the adapter on), in the same run, whatever the batch holds; and generation follows the same rule."""

    lora_dir, base_dir = tiny_granite_lora_dirs
    lm = LSLM(pretrained=lora_dir, device="cpu", batch_size=8)
    assert getattr(lm.model, "_hf_peft_config_loaded", False)
    text = [req("Question: What is the capital of France?\nAnswer:", c) for c in (" Paris", " Rome")]
    speech = speech_requests((1.0, 0.7))
    got = lm.loglikelihood(speech + text)
    base = LSLM(pretrained=base_dir, device="cpu").loglikelihood(text)
    np.testing.assert_allclose([r[0] for r in got[len(speech):]], [r[0] for r in base], atol=1e-5)
    expected = granite_reference(lora_dir, speech)  # the LoRA model as transformers loads it (adapter on)
    np.testing.assert_allclose([r[0] for r in got[:len(speech)]], expected, atol=1e-4)
    no_lora = granite_reference(base_dir, speech)
    assert np.abs(np.array(expected) - np.array(no_lora)).max() > 1e-3  # the adapter matters for speech
    kw = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    mixed = lm.generate_until([req("Question: <audio>\nAnswer:", kw, speech[0].args[2], kind="generate_until"),
                               req("Question: hi\nAnswer:", kw, kind="generate_until")])
    assert mixed[1] == LSLM(pretrained=base_dir, device="cpu").generate_until(
        [req("Question: hi\nAnswer:", kw, kind="generate_until")])[0]


def test_granite_adapter_declared_but_missing_is_an_error(tiny_granite_dir, tmp_path):
    import shutil

    path = tmp_path / "granite_no_adapter"
    shutil.copytree(tiny_granite_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["has_lora_adapter"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportError, match="speech LoRA adapter"):
        LSLM(pretrained=str(path), device="cpu")


# ---------------------------------------------------------------- issue 14: more audio LLM families
# Shared checks for the backends added by issue 14: each runs the real processor and the real model.

def processor_reference(model, proc, reqs, placeholder, **call):
    """(log-likelihoods, audio tokens per clip) from ``model(**proc(text=..., audio=[clip]))``: the
    real processor expands the placeholder and computes the features; nothing of the backend is used."""
    audio_id = model.config.audio_token_id
    scores, counts = [], []
    for r in reqs:
        ctx, cont, extra = r.args
        audio = extra["audio"][0]["array"]
        prompt = ctx.replace("<audio>", placeholder)
        full = proc(text=prompt + cont, audio=[audio], return_tensors="pt", **call)
        n_ctx = proc(text=prompt, audio=[audio], return_tensors="pt", **call)["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**full).logits[0].float()
        ids = full["input_ids"][0]
        scores.append(float(torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[n_ctx - 1:, 0].sum()))
        counts.append(int((ids == audio_id).sum()))
    return scores, counts


def audio_statuses(lm, reqs):
    """The planner's outcome of each distinct clip of ``reqs``, in request order."""
    from lmeval_speech.models.plan import audio_key

    keys = list(dict.fromkeys(audio_key(r.args[2]["audio"][0]) for r in reqs))
    return [lm.audio.status[k] for k in keys]


def check_parity(path, reqs, reference):
    """lslm's speech log-likelihoods and token counts equal the real processor + model's, at batch 4 and 1,
    and the audio matters (scores differ between clips)."""
    expected, counts = reference(path, reqs)
    lm = LSLM(pretrained=path, device="cpu", batch_size=4)
    got = [ll for ll, _ in lm.loglikelihood(reqs)]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [s.n_tokens for s in audio_statuses(lm, reqs)] == counts[::CHOICES]
    n = len(reqs) // CHOICES
    if n > 1:
        assert (np.ptp(np.array(got).reshape(n, CHOICES), axis=0) > 1e-5).all()
    one = [ll for ll, _ in LSLM(pretrained=path, device="cpu", batch_size=1).loglikelihood(reqs)]
    np.testing.assert_allclose(one, got, atol=1e-4)
    return lm


def check_capture(path, tmp_path, hidden_states):
    """Captured states (every hidden-state index) at the speech positions equal ``hidden_states(prompt,
    audio)`` there, and at the question's tokens equal the text twin's direct forward there.
    ``hidden_states(prompt, audio or None) -> (tuple of [T, D], speech positions)``."""
    from lmeval_speech.capture.store import CaptureReader
    from test_capture import QUESTION, SPEECH_CTX, TEXT_CTX, mc_requests

    audio = tone(1.3, seed=3)
    extra = {"audio": [{"array": audio, "sampling_rate": 16000}]}
    reqs = (mc_requests("speech_mmlu_continuation_geo_speech", SPEECH_CTX, 7, extra)
            + mc_requests("speech_mmlu_continuation_geo_text", TEXT_CTX, 7))
    lm = LSLM(pretrained=path, device="cpu", batch_size=3, capture="tokens", capture_dir=str(tmp_path / "cap"),
              capture_layers="all")
    plain = LSLM(pretrained=path, device="cpu", batch_size=3).loglikelihood(reqs)
    np.testing.assert_allclose([r[0] for r in lm.loglikelihood(reqs)], [r[0] for r in plain], atol=1e-6)
    reader = CaptureReader(tmp_path / "cap")
    (speech,) = [r for r in reader.records if r["modality"] == "speech"]
    (text,) = [r for r in reader.records if r["modality"] == "text"]
    hs, where = hidden_states(SPEECH_CTX, audio)
    arrays = reader.load(speech)
    assert speech["n_positions"] == len(where) > 0 and len(hs) == len(lm.backend_impl.decoder_layers) + 1
    np.testing.assert_allclose(arrays["pooled"], np.stack([h[where].mean(0).numpy() for h in hs]), atol=1e-4)
    np.testing.assert_allclose(arrays["tokens"][-1].astype(np.float32), hs[-1][where].numpy(), atol=2e-2)
    hs, _ = hidden_states(TEXT_CTX, None)
    enc = lm.tokenizer(TEXT_CTX, return_offsets_mapping=True, add_special_tokens=False)
    start = TEXT_CTX.index(QUESTION)
    q = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < start + len(QUESTION)]
    offset = len(lm.tok_encode(TEXT_CTX)) - len(enc["input_ids"])  # a BOS the backend adds
    q = [i + offset for i in q]
    assert text["n_positions"] == len(q)
    np.testing.assert_allclose(reader.load(text)["pooled"], np.stack([h[q].mean(0).numpy() for h in hs]), atol=1e-4)


def processor_hidden_states(model, proc, audio_text: str):
    """``check_capture``'s reference from the family's own processor and model: the prompt with ``<audio>`` written as
    the processor's ``audio_text``, every hidden state of one forward, and the positions of the audio token."""

    def hidden_states(prompt, audio):
        if audio is None:
            inputs = proc.tokenizer(prompt, return_tensors="pt")
        else:
            inputs = proc(text=prompt.replace("<audio>", audio_text), audio=[audio], return_tensors="pt")
        with torch.no_grad():
            hs = model(**inputs, output_hidden_states=True).hidden_states
        where = (inputs["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0].tolist()
        return [h[0] for h in hs], where

    return hidden_states


def check_text_twin(path, model, tokenizer, last_context: str):
    """The text twin's log-likelihoods equal the family's own model on the tokenizer's ids (two pairs, the second
    context ending in ``last_context``, e.g. a token the family treats specially)."""
    from test_lslm import req

    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"), (last_context, " C")]
    got = [ll for ll, _ in LSLM(pretrained=path, device="cpu", batch_size=2).loglikelihood([req(c, x) for c, x in pairs])]
    expected = [_score(tokenizer, lambda ids: model(**ids).logits, c, x) for c, x in pairs]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def check_interventions(path):
    from test_interventions import check_decoder_layer_edit, run

    plain = run(LSLM(pretrained=path, device="cpu"))
    for kind in ("angle", "length"):
        check_decoder_layer_edit(path, plain, kind)


# ---------------------------------------------------------------- Audio Flamingo 3
# The processor chat template released checkpoints carry (transformers' convert_audioflamingo3_to_hf.py).
AF3_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages if m['content'] is not none %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% set audio = namespace(found=False) %}{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}{% if c.get('type') == 'audio' or 'audio' in c %}{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}{% endif %}"
    "{% endfor %}{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_af3(path, max_audio_len=600):
    from transformers import (AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor,
                              WhisperFeatureExtractor)

    tok = build_tokenizer()
    tok.add_tokens(["<sound>"], special_tokens=True)
    torch.manual_seed(0)
    cfg = AudioFlamingo3Config(
        audio_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", **_text_config(tok)),
        audio_token_id=tok.convert_tokens_to_ids("<sound>"),
    )
    AudioFlamingo3ForConditionalGeneration(cfg).save_pretrained(path)
    AudioFlamingo3Processor(feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
                            tokenizer=tok, chat_template=AF3_CHAT_TEMPLATE, max_audio_len=max_audio_len).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_af3_dir(tmp_path_factory):
    return save_tiny_af3(tmp_path_factory.mktemp("tiny_audioflamingo3"))


def af3_reference(path, reqs):
    from transformers import AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return processor_reference(model, AudioFlamingo3Processor.from_pretrained(path), reqs, "<sound>")


def test_af3_loglikelihood_matches_the_processor_and_model(tiny_af3_dir):
    """Clips of 1 s, 31 s (two 30 s windows: 750 + 25 tokens, as the processor counts) and 0.7 s."""
    from lmeval_speech.models.backends.audioflamingo3 import AudioFlamingo3Backend

    lm = check_parity(tiny_af3_dir, speech_requests((1.0, 31.0, 0.7)), af3_reference)
    assert type(lm.backend_impl) is AudioFlamingo3Backend
    assert [s.n_tokens for s in lm.audio.status.values()] == [25, 775, 17]


def test_af3_captures_speech_and_text_states(tiny_af3_dir, tmp_path):
    from transformers import AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_af3_dir, dtype=torch.float32).eval()
    proc = AudioFlamingo3Processor.from_pretrained(tiny_af3_dir)
    check_capture(tiny_af3_dir, tmp_path, processor_hidden_states(model, proc, "<sound>"))


def test_af3_interventions_are_exact_and_local(tiny_af3_dir):
    check_interventions(tiny_af3_dir)


def test_af3_45_second_clip_is_never_cut(tiny_af3_dir):
    """45 s: two windows (30 s + 15 s), 750 + 375 tokens under one <sound>, as the processor gives, same scores."""
    clip = tone(45.0, seed=9)
    reqs = speech_requests((45.0,))
    for r in reqs:
        r.arguments[2]["audio"][0]["array"] = clip
    lm = check_parity(tiny_af3_dir, reqs, af3_reference)
    (status,) = lm.audio.status.values()
    assert status.n_tokens == 1125 and status.notes["seconds"] == 45.0 and not status.truncated


def test_af3_audio_past_the_processor_limit_is_cut_as_it_cuts_and_flagged(tmp_path):
    """A processor whose max_audio_len is 60 s cuts a 75 s clip at 60 s (a log warning); lslm cuts at the same
    point, scores as the processor + model do, and flags the item; audio_overflow=error refuses it."""
    path = save_tiny_af3(tmp_path / "af3_60s", max_audio_len=60)
    clip = tone(75.0, seed=4)
    reqs = speech_requests((75.0,))
    for r in reqs:
        r.arguments[2]["audio"][0]["array"] = clip
    lm = check_parity(path, reqs, af3_reference)
    assert lm.audio_settings.max_audio_seconds == 60.0
    (status,) = lm.audio.status.values()
    assert status.n_tokens == 1500 and status.truncated and status.notes["seconds"] == 60.0
    assert all(getattr(r[0], "truncated", "") for r in lm.loglikelihood(reqs))
    from lmeval_speech.models.plan import AudioRequestError

    with pytest.raises(AudioRequestError, match=r"75.0s exceeds 60.0s"):
        LSLM(pretrained=path, device="cpu", audio_overflow="error").loglikelihood(reqs)


def test_af3_chat_template_is_the_processors(tiny_af3_dir):
    from transformers import AudioFlamingo3Processor

    proc = AudioFlamingo3Processor.from_pretrained(tiny_af3_dir)
    lm = LSLM(pretrained=tiny_af3_dir, device="cpu")
    desc = "The following are questions (with answers) about geography."
    speech = lm.apply_chat_template([{"role": "system", "content": desc},
                                     {"role": "user", "content": "Question: <audio>\nAnswer:"}])
    expected = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": f"{desc}\n\nQuestion: "}, {"type": "audio"},
                                      {"type": "text", "text": "\nAnswer:"}]}], tokenize=False, add_generation_prompt=True)
    assert speech == expected.replace("<sound>", "<audio>")
    assert speech.startswith("<|im_start|>system\nYou are a helpful assistant.") and "user\n<audio>The following" in speech
    audio = tone(1.2, seed=5)
    reqs = [req(speech, "Paris", {"audio": [{"array": audio, "sampling_rate": 16000}]})]
    (ll, _), = lm.loglikelihood(reqs)
    # lm-eval moves the context's trailing whitespace ("assistant\n") into the continuation
    moved = [req(speech.rstrip(), speech[len(speech.rstrip()):] + "Paris", reqs[0].args[2])]
    np.testing.assert_allclose(ll, af3_reference(tiny_af3_dir, moved)[0][0], atol=1e-4)


# ---------------------------------------------------------------- Gemma 3n (audio path)
# The processor chat template of released Gemma 3n checkpoints.
GEMMA3N_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'audio' -%}\n"
    "                {{ '<audio_soft_token>' }}\n"
    "            {%- elif item['type'] == 'image' -%}\n"
    "                {{ '<image_soft_token>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def gemma3n_tokenizer():
    """The test BPE laid out as Gemma 3n's vocabulary: text ids (the per-layer table), then the vision and the
    audio vocabularies (``<end_of_audio>`` first, ``<audio_soft_token>`` next, as released); BOS added, as Gemma's."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer()
    n = len(base)
    base.add_tokens(["<start_of_audio>", "<start_of_image>", "<start_of_turn>", "<end_of_turn>",  # text
                     "<image_soft_token>", "<end_of_image>", "<vision_2>", "<vision_3>",  # vision vocab
                     "<end_of_audio>", "<audio_soft_token>", "<audio_2>", "<audio_3>"], special_tokens=True)  # audio
    backend = base.backend_tokenizer
    bos = base.convert_tokens_to_ids("<|im_start|>")
    backend.post_processor = TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                special_tokens=[("<|im_start|>", bos)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", extra_special_tokens={
            "boa_token": "<start_of_audio>", "boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
            "eoi_token": "<end_of_image>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"})
    return tok, n + 4  # text vocabulary size (ids below it have per-layer embeddings)


def save_tiny_gemma3n(path):
    from transformers import (Gemma3nAudioFeatureExtractor, Gemma3nConfig, Gemma3nForConditionalGeneration,
                              Gemma3nProcessor, SiglipImageProcessorPil)

    from lmeval_speech.models.backends.gemma3n import without_vision_tower

    tok, n_text = gemma3n_tokenizer()
    ids = tok.convert_tokens_to_ids
    # 6 layers, the last 2 reusing earlier layers' K/V (as released models do). Gemma 3n normalizes q, k and v,
    # so a position's K/V ignore its norm: a length edit reaches the score only through layers with their own K/V.
    cfg = Gemma3nConfig(
        text_config=dict(vocab_size=n_text + 8, vocab_size_per_layer_input=n_text, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         hidden_size_per_layer_input=8, layer_types=["sliding_attention", "full_attention"] * 3,
                         sliding_window=64, activation_sparsity_pattern=[0.95] + [0.0] * 5, num_kv_shared_layers=2,
                         laurel_rank=4, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, final_logit_softcapping=5.0),
        vision_config=dict(hidden_size=32, vocab_size=4, vocab_offset=n_text),
        audio_config=dict(hidden_size=32, conf_num_attention_heads=4, conf_num_hidden_layers=2,
                          sscp_conv_channel_size=[8, 8], vocab_size=4, vocab_offset=n_text + 4),
        audio_token_id=ids("<audio_soft_token>"), boa_token_id=ids("<start_of_audio>"), eoa_token_id=ids("<end_of_audio>"),
        image_token_id=ids("<image_soft_token>"), boi_token_id=ids("<start_of_image>"), eoi_token_id=ids("<end_of_image>"),
    )
    torch.manual_seed(0)
    with without_vision_tower():  # its vision tower is a timm model (needs torchvision); the audio path has none
        model = Gemma3nForConditionalGeneration(cfg)
    with torch.no_grad():  # zero-initialized scales (AltUp's correct_output_scale: it gates the per-layer inputs)
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=SiglipImageProcessorPil(),
                     tokenizer=tok, chat_template=GEMMA3N_CHAT_TEMPLATE).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gemma3n_dir(tmp_path_factory):
    return save_tiny_gemma3n(tmp_path_factory.mktemp("tiny_gemma3n"))


def _gemma3n(path):
    from transformers import AutoProcessor, Gemma3nForConditionalGeneration

    from lmeval_speech.models.backends.gemma3n import without_vision_tower

    with without_vision_tower():
        model = Gemma3nForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def gemma3n_reference(path, reqs, **call):
    model, proc = _gemma3n(path)
    return processor_reference(model, proc, reqs, "<audio_soft_token>", **call)


def test_gemma3n_loglikelihood_matches_the_processor_and_model(tiny_gemma3n_dir):
    """188 soft tokens per clip whatever its length (the encoder gives fewer; the model pads them)."""
    from lmeval_speech.models.backends.gemma3n import Gemma3nBackend

    lm = check_parity(tiny_gemma3n_dir, speech_requests((1.0, 2.3, 0.7)), gemma3n_reference)
    assert type(lm.backend_impl) is Gemma3nBackend
    assert [s.n_tokens for s in lm.audio.status.values()] == [188, 188, 188]
    assert lm.tok_encode("Question:")[0] == lm.tokenizer.bos_token_id


def test_gemma3n_text_twin_matches_the_model(tiny_gemma3n_dir):
    """Text only (per-layer inputs, soft-capped logits, an <end_of_audio> id from the audio vocabulary)."""
    model, proc = _gemma3n(tiny_gemma3n_dir)
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"), ("A. Paris B. Rome<end_of_audio>", " C")]
    got = [ll for ll, _ in LSLM(pretrained=tiny_gemma3n_dir, device="cpu", batch_size=2).loglikelihood(
        [req(c, x) for c, x in pairs])]
    expected = [_score(proc.tokenizer, lambda ids: model(**ids).logits, c, x) for c, x in pairs]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_gemma3n_captures_speech_and_text_states(tiny_gemma3n_dir, tmp_path):
    model, proc = _gemma3n(tiny_gemma3n_dir)
    active = model.config.text_config.altup_active_idx

    def hidden_states(prompt, audio):
        if audio is None:
            inputs = proc.tokenizer(prompt, return_tensors="pt")
        else:
            inputs = proc(text=prompt.replace("<audio>", "<audio_soft_token>"), audio=[audio], return_tensors="pt")
        with torch.no_grad():
            hs = model(**inputs, output_hidden_states=True).hidden_states
        where = (inputs["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0].tolist()
        return [h[active, 0] for h in hs], where  # layers output [streams, B, T, D]

    check_capture(tiny_gemma3n_dir, tmp_path, hidden_states)


def test_gemma3n_interventions_are_exact_and_local(tiny_gemma3n_dir):
    check_interventions(tiny_gemma3n_dir)


def test_gemma3n_45_second_clip_is_cut_at_30_s_as_its_extractor_cuts_and_flagged(tiny_gemma3n_dir):
    clip = tone(45.0, seed=9)
    reqs = speech_requests((45.0,))
    for r in reqs:
        r.arguments[2]["audio"][0]["array"] = clip
    lm = check_parity(tiny_gemma3n_dir, reqs, gemma3n_reference)  # the processor cuts at 30 s too
    (status,) = lm.audio.status.values()
    assert status.truncated and status.notes["seconds"] == 30.0 and status.n_tokens == 188


def test_gemma3n_chat_template_and_generation(tiny_gemma3n_dir):
    model, proc = _gemma3n(tiny_gemma3n_dir)
    lm = LSLM(pretrained=tiny_gemma3n_dir, device="cpu", batch_size=2)
    desc = "The following are questions (with answers) about geography."
    speech = lm.apply_chat_template([{"role": "system", "content": desc},
                                     {"role": "user", "content": "Question: <audio>\nAnswer:"}])
    expected = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": f"{desc}\n\nQuestion: "}, {"type": "audio"},
                                      {"type": "text", "text": "\nAnswer:"}]}], tokenize=False, add_generation_prompt=True)
    assert speech == expected.replace("<audio_soft_token>", "<audio>")
    assert speech.startswith("<|im_start|><start_of_turn>user\n") and "Question:<audio>Answer:" in speech
    audio = tone(1.2, seed=5)
    extra = {"audio": [{"array": audio, "sampling_rate": 16000}]}
    (ll, _), = lm.loglikelihood([req(speech, "Paris", extra)])
    moved = [req(speech.rstrip(), speech[len(speech.rstrip()):] + "Paris", extra)]
    # the template wrote BOS: no second one (as the processor's apply_chat_template(tokenize=True) does)
    np.testing.assert_allclose(ll, gemma3n_reference(tiny_gemma3n_dir, moved, add_special_tokens=False)[0][0],
                               atol=1e-4)
    # greedy generation equals the model's own generate on the processor's output (per-layer inputs included)
    kw = {"until": ["<|im_end|>"], "max_gen_toks": 5, "do_sample": False}
    texts = ["Question: What is the capital of France?\nAnswer:", "the quick"]
    got = lm.generate_until([req(speech, kw, extra, kind="generate_until")] + [req(t, kw, kind="generate_until")
                                                                               for t in texts])
    inputs = proc(text=speech.replace("<audio>", "<audio_soft_token>"), audio=[audio], return_tensors="pt",
                  add_special_tokens=False)
    expected = [model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]]
    for t in texts:
        ids = proc.tokenizer(t, return_tensors="pt")
        expected.append(model.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert got == [proc.tokenizer.decode(e, skip_special_tokens=True) for e in expected]


def test_gemma3n_generate_gets_the_prompts_per_layer_inputs(tiny_gemma3n_dir):
    """Generation from embeddings: the step scores equal the model's generate on the ids; without the
    prompt's ids (no per-layer inputs on the prefill step) they would not."""
    model, _ = _gemma3n(tiny_gemma3n_dir)
    b = LSLM(pretrained=tiny_gemma3n_dir, device="cpu").backend_impl
    ids = torch.tensor([b.tokenizer.encode("Question: What is the capital of France?\nAnswer:")])
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = torch.stack(model.generate(input_ids=ids, attention_mask=mask, **kw).scores)
        ours = torch.stack(b.generate(prompt_ids=ids, inputs_embeds=b.embed_tokens(ids), attention_mask=mask, **kw).scores)
        blind = torch.stack(b.generate(inputs_embeds=b.embed_tokens(ids), attention_mask=mask, **kw).scores)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (blind - ref).abs().max() > 1e-3


# ---------------------------------------------------------------- Qwen3-Omni-MoE thinker
QWEN3_OMNI_TOKENS = dict(audio_token="<|audio_pad|>", audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>",
                         image_token="<|image_pad|>", video_token="<|video_pad|>", vision_bos_token="<|vision_start|>",
                         vision_eos_token="<|vision_end|>")


def save_tiny_qwen3_omni(path):
    """A random-weight Qwen3-Omni thinker (MoE LLM: 4 experts, top 2) with its tokenizer and feature extractor
    (its processor needs torchvision for its image and video processors)."""
    from transformers import (PreTrainedTokenizerFast, Qwen3OmniMoeThinkerConfig,
                              Qwen3OmniMoeThinkerForConditionalGeneration, WhisperFeatureExtractor)

    base = build_tokenizer()
    base.add_tokens(list(QWEN3_OMNI_TOKENS.values()), special_tokens=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  extra_special_tokens=QWEN3_OMNI_TOKENS)
    ids = tok.convert_tokens_to_ids
    cfg = Qwen3OmniMoeThinkerConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, output_dim=64, downsample_hidden_size=16, n_window=50, n_window_infer=400),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           deepstack_visual_indexes=[0]),
        # 3 layers: RMSNorm ahead of every layer makes one layer blind to a position's norm, so a length edit at
        # hidden state 1 reaches the score through the residual stream of the layers after it
        text_config=dict(_text_config(tok), num_hidden_layers=3, head_dim=16, moe_intermediate_size=32, num_experts=4,
                         num_experts_per_tok=2,
                         decoder_sparse_step=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        audio_token_id=ids("<|audio_pad|>"), audio_start_token_id=ids("<|audio_start|>"),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    Qwen3OmniMoeThinkerForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen3_omni_dir(tmp_path_factory):
    return save_tiny_qwen3_omni(tmp_path_factory.mktemp("tiny_qwen3_omni_thinker"))


def _qwen3_omni(path):
    from transformers import AutoTokenizer, Qwen3OmniMoeThinkerForConditionalGeneration, WhisperFeatureExtractor

    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), WhisperFeatureExtractor.from_pretrained(path)


def qwen3_omni_audio_inputs(fe, tok, audio):
    """``Qwen3OmniMoeProcessor._process_audio`` itself (the processor's own audio path, with its default
    audio kwargs) on an object holding what it reads: the features, the mask, the placeholder expansion."""
    from types import SimpleNamespace

    from transformers import Qwen3OmniMoeProcessor

    proc = SimpleNamespace(n_window=Qwen3OmniMoeProcessor.n_window, feature_extractor=fe, audio_token=tok.audio_token)
    proc.replace_audio_token = lambda inputs, audio_idx: Qwen3OmniMoeProcessor.replace_audio_token(proc, inputs, audio_idx)
    inputs, (replacement,) = Qwen3OmniMoeProcessor._process_audio(proc, [audio], return_tensors="pt",
                                                                   **Qwen3OmniMoeProcessor.audio_kwargs)
    return inputs, replacement


def qwen3_omni_reference(path, reqs):
    model, tok, fe = _qwen3_omni(path)
    scores, counts = [], []
    for r in reqs:
        ctx, cont, extra = r.args
        inputs, replacement = qwen3_omni_audio_inputs(fe, tok, extra["audio"][0]["array"])
        prompt = ctx.replace("<audio>", "<|audio_start|>" + replacement + "<|audio_end|>")
        scores.append(_score(tok, lambda ids: model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                                    input_features=inputs["input_features"],
                                                    feature_attention_mask=inputs["feature_attention_mask"]).logits,
                             prompt, cont))
        counts.append(replacement.count(tok.audio_token))
    return scores, counts


def test_qwen3_omni_loglikelihood_matches_the_thinker(tiny_qwen3_omni_dir):
    """1 s -> 13 tokens (one full 100-frame chunk), 2.3 s -> 30, 0.7 s -> 9, 3.05 s (not a whole number of
    mel hops: 305 frames, 3 full chunks + 5 frames) -> 40, as the processor's audio path counts them."""
    from lmeval_speech.models.backends.qwen3_omni_moe import Qwen3OmniMoeThinkerBackend

    reqs = speech_requests((1.0, 2.3, 0.7))
    odd = speech_requests((3.05,))
    for r in odd:
        r.arguments[2]["audio"][0]["array"] = tone(3.05, seed=2)[:48_857]  # 305 hops + 57 samples
    lm = check_parity(tiny_qwen3_omni_dir, reqs + odd, qwen3_omni_reference)
    assert type(lm.backend_impl) is Qwen3OmniMoeThinkerBackend
    assert [s.n_tokens for s in audio_statuses(lm, reqs + odd)] == [13, 30, 9, 40]


def test_qwen3_omni_position_ids_follow_the_thinker(tiny_qwen3_omni_dir):
    """run_decoder's positions are the thinker's own (``compute_3d_position_ids``) for a padded batch."""
    lm = LSLM(pretrained=tiny_qwen3_omni_dir, device="cpu")
    b = lm.backend_impl
    a = b.audio_token_id
    ids = torch.tensor([[11, 3] + [a] * 5 + [5, 12, 13], [11, 3] + [a] * 2 + [5, 12, 0, 0, 0, 0]])
    mask = (torch.arange(10) < torch.tensor([[10], [6]])).long()
    captured = {}
    real = b.decoder.forward
    b.decoder.forward = lambda **kw: captured.update(kw) or real(**kw)
    b.run_decoder(b.embed_tokens(ids), mask, ids)
    thinker = b.model.model
    thinker.rope_deltas = None
    expected = thinker.compute_3d_position_ids(ids, None, None, b.embed_tokens(ids), mask, None)
    assert torch.equal(captured["position_ids"], expected)


def test_qwen3_omni_captures_speech_and_text_states(tiny_qwen3_omni_dir, tmp_path):
    model, tok, fe = _qwen3_omni(tiny_qwen3_omni_dir)

    def hidden_states(prompt, audio):
        kw = {}
        if audio is not None:
            inputs, replacement = qwen3_omni_audio_inputs(fe, tok, audio)
            prompt = prompt.replace("<audio>", "<|audio_start|>" + replacement + "<|audio_end|>")
            kw = dict(input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"])
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            hs = model(**ids, **kw, output_hidden_states=True).hidden_states
        where = (ids["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0].tolist()
        return [h[0] for h in hs], where

    check_capture(tiny_qwen3_omni_dir, tmp_path, hidden_states)


def test_qwen3_omni_interventions_are_exact_and_local(tiny_qwen3_omni_dir):
    check_interventions(tiny_qwen3_omni_dir)


def test_qwen3_omni_45_second_clip_is_taken_whole(tiny_qwen3_omni_dir):
    """45 s in one piece (no 30 s window: 45 chunks of 13 tokens), scored as the thinker scores it."""
    clip = tone(45.0, seed=9)
    reqs = speech_requests((45.0,))
    for r in reqs:
        r.arguments[2]["audio"][0]["array"] = clip
    lm = check_parity(tiny_qwen3_omni_dir, reqs, qwen3_omni_reference)
    (status,) = lm.audio.status.values()
    assert status.n_tokens == 585 and status.notes["seconds"] == 45.0 and not status.truncated


def test_full_qwen3_omni_checkpoint_loads_its_thinker(tiny_qwen3_omni_dir, tmp_path):
    import shutil

    from transformers import (Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration,
                              Qwen3OmniMoeThinkerForConditionalGeneration)

    thinker = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tiny_qwen3_omni_dir)
    full = Qwen3OmniMoeForConditionalGeneration(
        Qwen3OmniMoeConfig(thinker_config=thinker.config.to_dict(), enable_audio_output=False))
    full.thinker.load_state_dict(thinker.state_dict())
    path = tmp_path / "tiny_qwen3_omni"
    full.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(f"{tiny_qwen3_omni_dir}/{name}", path / name)
    lm = LSLM(pretrained=str(path), device="cpu", batch_size=4)
    assert isinstance(lm.model, Qwen3OmniMoeThinkerForConditionalGeneration)
    reqs = speech_requests((1.0, 0.7))
    expected = LSLM(pretrained=tiny_qwen3_omni_dir, device="cpu", batch_size=4).loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in lm.loglikelihood(reqs)], [x for x, _ in expected], atol=1e-5)


# ---------------------------------------------------------------- Phi-4-multimodal (audio path)
# By module name, so it also reaches the audio encoder's feed-forward and attention output layers: a stricter case
# than an adapter on the LLM's layers only (the encoder must then run in the model's speech state).
PHI4_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def save_tiny_phi4(path, speech_lora=True):
    """A random-weight Phi-4-multimodal with its tokenizer and feature extractor (its processor needs
    torchvision), and a random speech LoRA in ``speech-lora/`` as released checkpoints carry it (peft's
    file format: ``base_model.model.``-prefixed keys)."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

    tok = multimodal_tokenizer({"image_token": "<|endoftext10|>", "audio_token": "<|endoftext11|>"})
    tok.add_tokens(["<|user|>", "<|end|>", "<|assistant|>"], special_tokens=True)
    ids = tok.convert_tokens_to_ids
    cfg = Phi4MultimodalConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, crop_size=28, image_token_id=ids("<|endoftext10|>")),
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=4,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32,
                          audio_token_id=ids("<|endoftext11|>")),
    )
    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    Phi4MultimodalFeatureExtractor().save_pretrained(path)
    if speech_lora:
        from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
        from safetensors.torch import save_file

        lora = LoraConfig(init_lora_weights=False, **PHI4_LORA)
        torch.manual_seed(1)
        inject_adapter_in_model(lora, model)
        (path / "speech-lora").mkdir()
        lora.save_pretrained(path / "speech-lora")
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
                  str(path / "speech-lora" / "adapter_model.safetensors"))
    return str(path)


@pytest.fixture(scope="session")
def tiny_phi4_dir(tmp_path_factory):
    pytest.importorskip("peft")
    return save_tiny_phi4(tmp_path_factory.mktemp("tiny_phi4_multimodal"))


def _phi4(path, speech_lora):
    """The model as transformers loads it, with the speech LoRA merged into its weights by hand
    (W + B A alpha / r, read from the adapter file: no peft) when ``speech_lora``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

    model = Phi4MultimodalForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if speech_lora:
        lora = load_file(f"{path}/speech-lora/adapter_model.safetensors")
        scale = PHI4_LORA["lora_alpha"] / PHI4_LORA["r"]
        modules = dict(model.named_modules())
        with torch.no_grad():
            for key in [k for k in lora if k.endswith("lora_A.weight")]:
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                modules[name].weight += lora[key.replace("lora_A", "lora_B")] @ lora[key] * scale
    return model, AutoTokenizer.from_pretrained(path), Phi4MultimodalFeatureExtractor.from_pretrained(path)


def phi4_reference(path, reqs, speech_lora=True):
    """The processor's audio path by hand (its image processor needs torchvision): the feature extractor's
    features and ``audio_embed_sizes``, the audio token repeated that many times
    (``Phi4MultimodalProcessor.replace_audio_token``), then the model's forward."""
    from types import SimpleNamespace

    from transformers import Phi4MultimodalProcessor

    model, tok, fe = _phi4(path, speech_lora)
    audio_token = tok.convert_ids_to_tokens(model.config.audio_config.audio_token_id)
    scores, counts = [], []
    for r in reqs:
        ctx, cont, extra = r.args
        feats = fe([extra["audio"][0]["array"]], sampling_rate=16000, return_tensors="pt")
        expansion = Phi4MultimodalProcessor.replace_audio_token(SimpleNamespace(audio_token=audio_token), feats, 0)
        prompt = ctx.replace("<audio>", expansion)
        scores.append(_score(tok, lambda ids: model(**ids, audio_input_features=feats["audio_input_features"],
                                                    audio_embed_sizes=feats["audio_embed_sizes"]).logits, prompt, cont))
        counts.append(expansion.count(audio_token))
    return scores, counts


def test_phi4_speech_uses_the_speech_lora_and_text_the_base_model(tiny_phi4_dir):
    """Speech twins equal the real model with the speech LoRA (merged by hand), token counts included; text
    twins in the same run equal the base model; the adapter changes speech scores."""
    from lmeval_speech.models.backends.phi4_multimodal import Phi4MultimodalBackend

    reqs = speech_requests((1.0, 2.3, 0.7))
    lm = check_parity(tiny_phi4_dir, reqs, phi4_reference)
    assert type(lm.backend_impl) is Phi4MultimodalBackend and lm.backend_impl.has_speech_lora
    assert [s.n_tokens for s in lm.audio.status.values()] == [13, 29, 9]
    text = [req("Question: What is the capital of France?\nAnswer:", c) for c in (" Paris", " Rome")]
    got = lm.loglikelihood(reqs + text)
    model, tok, _ = _phi4(tiny_phi4_dir, speech_lora=False)
    base = [_score(tok, lambda ids: model(**ids).logits, r.args[0], r.args[1]) for r in text]
    np.testing.assert_allclose([r[0] for r in got[len(reqs):]], base, atol=1e-4)
    without = phi4_reference(tiny_phi4_dir, reqs, speech_lora=False)[0]
    assert np.abs(np.array([r[0] for r in got[:len(reqs)]]) - np.array(without)).max() > 1e-3


def test_phi4_audio_after_a_text_batch_is_encoded_with_the_speech_lora(tiny_phi4_dir):
    lm = LSLM(pretrained=tiny_phi4_dir, device="cpu")
    lm.loglikelihood([req("Question: What is the capital of France?\nAnswer:", " Paris")])  # adapter off
    reqs = speech_requests((1.0,))
    np.testing.assert_allclose([r[0] for r in lm.loglikelihood(reqs)], phi4_reference(tiny_phi4_dir, reqs)[0], atol=1e-4)


def test_phi4_captures_speech_and_text_states(tiny_phi4_dir, tmp_path):
    from transformers import Phi4MultimodalProcessor

    lora, tok, fe = _phi4(tiny_phi4_dir, speech_lora=True)
    base, _, _ = _phi4(tiny_phi4_dir, speech_lora=False)
    audio_id = base.config.audio_config.audio_token_id

    def hidden_states(prompt, audio):
        model, kw = base, {}
        if audio is not None:
            from types import SimpleNamespace

            feats = fe([audio], sampling_rate=16000, return_tensors="pt")
            token = tok.convert_ids_to_tokens(audio_id)
            prompt = prompt.replace("<audio>", Phi4MultimodalProcessor.replace_audio_token(
                SimpleNamespace(audio_token=token), feats, 0))
            model, kw = lora, dict(audio_input_features=feats["audio_input_features"],
                                   audio_embed_sizes=feats["audio_embed_sizes"])
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            hs = model(**ids, **kw, output_hidden_states=True).hidden_states
        return [h[0] for h in hs], (ids["input_ids"][0] == audio_id).nonzero()[:, 0].tolist()

    check_capture(tiny_phi4_dir, tmp_path, hidden_states)


def test_phi4_interventions_are_exact_and_local(tiny_phi4_dir):
    check_interventions(tiny_phi4_dir)


def test_phi4_45_second_clip_is_taken_whole(tiny_phi4_dir):
    clip = tone(45.0, seed=9)
    reqs = speech_requests((45.0,))
    for r in reqs:
        r.arguments[2]["audio"][0]["array"] = clip
    lm = check_parity(tiny_phi4_dir, reqs, phi4_reference)
    (status,) = lm.audio.status.values()
    assert status.n_tokens == 563 and status.notes["seconds"] == 45.0 and not status.truncated


def test_phi4_without_speech_lora_warns_and_runs_the_base_model(tmp_path, caplog):
    pytest.importorskip("peft")
    path = save_tiny_phi4(tmp_path / "phi4_no_lora", speech_lora=False)
    reqs = speech_requests((1.0,))
    with caplog.at_level("WARNING"):
        lm = LSLM(pretrained=path, device="cpu")
    assert "no speech-lora/" in caplog.text and not lm.backend_impl.has_speech_lora
    np.testing.assert_allclose([r[0] for r in lm.loglikelihood(reqs)],
                               phi4_reference(path, reqs, speech_lora=False)[0], atol=1e-4)


def test_phi4_speech_lora_that_does_not_fit_is_an_error(tiny_phi4_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "phi4_bad_lora"
    shutil.copytree(tiny_phi4_dir, path)
    weights = path / "speech-lora" / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({k.replace("base_model.model.model.", "base_model.model.decoder."): v for k, v in state.items()},
              str(weights))
    with pytest.raises(ValueError, match="does not fit the model"):
        LSLM(pretrained=str(path), device="cpu")


@pytest.mark.parametrize("fixture", ["tiny_af3_dir", "tiny_gemma3n_dir", "tiny_qwen3_omni_dir", "tiny_phi4_dir"])
def test_generation_does_not_depend_on_the_batch(fixture, request):
    """Left-padded batches of speech and text prompts of different lengths generate what each prompt alone does."""
    path = request.getfixturevalue(fixture)
    kw = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    clips = [{"audio": [{"array": tone(s, seed=i), "sampling_rate": 16000}]} for i, s in enumerate((1.0, 2.3))]
    reqs = [req("Question: <audio>\nAnswer:", kw, clips[0], kind="generate_until"),
            req("The following are questions (with answers) about geography.\n\nQuestion: <audio>\nAnswer:", kw,
                clips[1], kind="generate_until"),
            req("the quick", kw, kind="generate_until"),
            req("Question: What is the capital of France?\nAnswer:", kw, kind="generate_until")]
    one = LSLM(pretrained=path, device="cpu", batch_size=1).generate_until(reqs)
    assert LSLM(pretrained=path, device="cpu", batch_size=4).generate_until(reqs) == one
    assert len(set(one)) == len(one)


# ---------------------------------------------------------------- capture + interventions on the first three families
def _omni_hidden_states(path):
    from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration, WhisperFeatureExtractor
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok, fe = AutoTokenizer.from_pretrained(path), WhisperFeatureExtractor.from_pretrained(path)

    def hidden_states(prompt, audio):
        kw = {}
        if audio is not None:
            feats = fe([audio], sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
            n = int(_get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))[0])
            prompt = prompt.replace("<audio>", "<|audio_bos|>" + "<|AUDIO|>" * n + "<|audio_eos|>")
            kw = dict(input_features=feats["input_features"], feature_attention_mask=feats["attention_mask"])
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            hs = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], output_hidden_states=True,
                       **kw).hidden_states
        where = (ids["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0].tolist()
        return [h[0] for h in hs], where
    return hidden_states


def _voxtral_hidden_states(path):
    from transformers import AutoTokenizer, VoxtralForConditionalGeneration, VoxtralProcessor, WhisperFeatureExtractor

    model = VoxtralForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    proc = VoxtralProcessor(feature_extractor=WhisperFeatureExtractor.from_pretrained(path), tokenizer=tok)

    def hidden_states(prompt, audio):
        kw = {}
        if audio is not None:
            kw["input_features"] = proc._retrieve_input_features(
                [audio], 3000, sampling_rate=16000, padding=True, truncation=False, pad_to_multiple_of=480000,
                return_tensors="pt")
            n = math.ceil(math.ceil(len(audio) / 480000) * 480000 / 160 / 8)
            prompt = prompt.replace("<audio>", "[BEGIN_AUDIO]" + "[AUDIO]" * n)
        ids = tok(tok.bos_token + prompt, return_tensors="pt")  # every Voxtral prompt starts with BOS
        with torch.no_grad():
            hs = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], output_hidden_states=True,
                       **kw).hidden_states
        where = (ids["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0].tolist()
        return [h[0] for h in hs], where
    return hidden_states


def _granite_hidden_states(path):
    from transformers import AutoTokenizer, GraniteSpeechFeatureExtractor, GraniteSpeechForConditionalGeneration

    model = GraniteSpeechForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    fe_settings = SimpleNamespace(melspec_kwargs={"hop_length": 160}, projector_window_size=15,
                                  projector_downsample_rate=5)

    def hidden_states(prompt, audio):
        kw = {}
        if audio is not None:
            kw["input_features"] = torch.from_numpy(_granite_log_mel_numpy(audio)).float()  # independent of the backend
            n = GraniteSpeechFeatureExtractor._get_num_audio_features(fe_settings, [len(audio)])[0]
            prompt = prompt.replace("<audio>", "<|audio|>" * n)
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            hs = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], output_hidden_states=True,
                       **kw).hidden_states
        where = (ids["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0].tolist()
        return [h[0] for h in hs], where
    return hidden_states


FIRST_FAMILIES = {"tiny_omni_dir": _omni_hidden_states, "tiny_voxtral_dir": _voxtral_hidden_states,
                  "tiny_granite_dir": _granite_hidden_states}


@pytest.mark.parametrize("fixture", sorted(FIRST_FAMILIES))
def test_capture_matches_the_real_models_hidden_states(fixture, request, tmp_path):
    """Qwen2.5-Omni thinker, Voxtral, Granite Speech: captured states at the speech positions and the
    question's tokens equal the real model's own ``output_hidden_states`` (processor-style inputs)."""
    path = request.getfixturevalue(fixture)
    check_capture(path, tmp_path, FIRST_FAMILIES[fixture](path))


@pytest.mark.parametrize("fixture", sorted(FIRST_FAMILIES))
def test_interventions_are_exact_and_local_on_the_first_families(fixture, request):
    check_interventions(request.getfixturevalue(fixture))


def test_gemma3n_placeholder_whitespace_is_never_scored_as_part_of_a_choice(tiny_gemma3n_dir):
    """Found by a review: Gemma 3n's audio placeholder ends in "\\n\\n"; with a prompt ending in its audio
    (speech_openbookqa's speech twin), lm-eval's trailing-whitespace rule moved those tokens into every
    choice (scored ['\\n', '\\n', ' Paris']), shifting acc_norm and every log-likelihood gap."""
    lm = LSLM(pretrained=tiny_gemma3n_dir, device="cpu")
    audio = {"audio": [{"array": tone(1.0), "sampling_rate": 16000}]}
    reqs = [req(ctx, " Paris", audio) for ctx in ("<audio>", "Question: <audio>")]
    _, per_request, _ = lm._plan(reqs)
    for i, r in enumerate(reqs):
        seq = lm.planner.build(i, r.args[0], r.args[1], per_request[i], r)
        want = lm.tokenizer.encode(" Paris", add_special_tokens=False)
        assert seq.cont == want, [lm.tokenizer.decode([t]) for t in seq.cont]
        assert lm.tokenizer.decode(lm._context(seq)[-3:]).endswith("<end_of_audio>\n\n")  # kept in the context


def test_a_tokenizer_without_template_text_still_records_a_chat_template(tiny_voxtral_dir, monkeypatch):
    """Voxtral's mistral-common tokenizer raises NotImplementedError from ``get_chat_template``; lm-eval's
    CLI calls ``lm.chat_template(True)`` for every run with --apply_chat_template, which then died."""
    lm = LSLM(pretrained=tiny_voxtral_dir, device="cpu")

    def no_text(*a, **k):
        raise NotImplementedError("mistral-common")

    monkeypatch.setattr(lm.tokenizer, "get_chat_template", no_text, raising=False)
    assert "own chat format" in lm.chat_template(True)


# string content (a tokenizer's rendering) or content items (a processor's: Qwen2.5-Omni's processor, which reads
# the checkpoint's chat_template.jinja, renders an audio item as its template does, <|audio_bos|><|AUDIO|><|audio_eos|>)
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("fixture,card", [
    ("tiny_omni_dir", "You are Qwen, a virtual human developed by the Qwen Team"),
    ("tiny_granite_dir", "Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\nYou are Granite")])
def test_chat_template_renders_the_model_cards_system_prompt(request, tmp_path, fixture, card):
    """Found by a review: every system turn was folded into the user turn, so the template's default
    system prompt always won: Qwen2.5-Omni's cards use "You are Qwen, a virtual human ...", and Granite's
    template default writes the day of the run (a rerun on another day had another prompt)."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / fixture
    shutil.copytree(request.getfixturevalue(fixture), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHATML_WITH_DEFAULT_SYSTEM
    tok.save_pretrained(path)
    chat = [{"role": "system", "content": "About geography."}, {"role": "user", "content": "Question: <audio>\nAnswer:"}]
    lm = LSLM(pretrained=str(path), device="cpu")
    text = lm.apply_chat_template(chat)
    assert text.startswith("<|im_start|>system\n" + card) and "You are a helpful assistant." not in text
    assert "<|im_start|>user\nAbout geography.\n\nQuestion: <audio>\nAnswer:" in text  # the task's turn as before
    assert lm.identity["chat_system_prompt"].startswith(card)  # recorded with the run
    plain = LSLM(pretrained=str(path), device="cpu", system_prompt="template")
    assert plain.apply_chat_template(chat).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "chat_system_prompt" not in plain.identity
    with pytest.raises(ValueError, match="system_prompt="):
        LSLM(pretrained=str(path), device="cpu", system_prompt="mine")


def test_phi4_with_and_without_its_speech_lora_have_different_identities(tiny_phi4_dir, tmp_path):
    """Found by a review: a checkpoint without ``speech-lora/`` runs the base model with only a log line,
    and its runs carried the same model identity as the LoRA's: the report could not tell them apart."""
    import hashlib
    import shutil

    bare = tmp_path / "phi4_no_lora"
    shutil.copytree(tiny_phi4_dir, bare)
    shutil.rmtree(bare / "speech-lora")
    with_lora = LSLM(pretrained=tiny_phi4_dir, device="cpu").identity
    without = LSLM(pretrained=str(bare), device="cpu").identity
    lora_file = Path(tiny_phi4_dir) / "speech-lora" / "adapter_model.safetensors"
    assert with_lora["adapter_sha256"] == hashlib.sha256(lora_file.read_bytes()).hexdigest()
    assert "adapter_sha256" not in without
