"""Granite Speech Plus (issue 31) through ``lslm``: a tiny random ``GraniteSpeechPlusForConditionalGeneration`` (its
projector reads the encoder's last and an intermediate hidden state), scored against the installed class's forward
on features from transformers' numpy audio utilities, with the Granite LLM's ``logits_scaling``; speech LoRA on for
audio only; capture and interventions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tone
from test_backends import (
    GRANITE_FE,
    _granite_log_mel_numpy,
    _score,
    _text_config,
    check_capture,
    check_interventions,
    check_parity,
)
from test_lslm import req, speech_requests

from lmeval_speech.models.lslm import LSLM


def save_tiny_granite_plus(path, tokenizer):
    from transformers import (
        GraniteSpeechPlusConfig,
        GraniteSpeechPlusForConditionalGeneration,
    )

    torch.manual_seed(0)
    cfg = GraniteSpeechPlusConfig(
        text_config=dict(model_type="granite", embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5,
                         attention_multiplier=0.25, **_text_config(tokenizer)),
        encoder_config=dict(input_dim=160, hidden_dim=64, num_layers=2, num_heads=4, output_dim=42, context_size=200,
                            max_pos_emb=512, conv_kernel_size=15, cat_hidden_layers=[0]),
        projector_config=dict(model_type="blip_2_qformer", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, encoder_hidden_size=128, cross_attention_frequency=1),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"), has_lora_adapter=False,
    )
    GraniteSpeechPlusForConditionalGeneration(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(GRANITE_FE))
    return str(path)


@pytest.fixture(scope="module")
def tiny_granite_plus_dir(tmp_path_factory, tokenizer):
    return save_tiny_granite_plus(tmp_path_factory.mktemp("tiny_granite_speech_plus"), tokenizer)


def _model(path):
    from transformers import AutoTokenizer, GraniteSpeechPlusForConditionalGeneration

    return (GraniteSpeechPlusForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def _inputs(audio):
    """Features from transformers' numpy audio utilities and ``GraniteSpeechFeatureExtractor``'s token count (3 per
    15 encoder frames), as the processor expands ``<|audio|>``."""
    feats = torch.from_numpy(_granite_log_mel_numpy(audio)).float()
    return feats, math.ceil((len(audio) // 160 + 1) // 2 / 15) * 3


def granite_plus_reference(path, reqs):
    model, tok = _model(path)
    scale = model.config.text_config.logits_scaling  # the Granite LLM's head (see test_backends_fixes)
    scores, counts = [], []
    for r in reqs:
        ctx, cont, extra = r.args
        feats, n = _inputs(extra["audio"][0]["array"])
        prompt = ctx.replace("<audio>", "<|audio|>" * n)
        scores.append(_score(tok, lambda ids: model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                                    input_features=feats).logits / scale, prompt, cont))
        counts.append(n)
    return scores, counts


def test_granite_plus_loglikelihood_matches_the_model(tiny_granite_plus_dir):
    from lmeval_speech.models.backends.granite_speech import GraniteSpeechPlusBackend

    lm = check_parity(tiny_granite_plus_dir, speech_requests((1.0, 2.3, 0.7)), granite_plus_reference)
    assert type(lm.backend_impl) is GraniteSpeechPlusBackend
    b = lm.backend_impl
    audio = tone(1.0, seed=2)
    assert b.encode([audio])[0].shape == (b.num_audio_tokens(len(audio)), b.model.config.text_config.hidden_size)


def test_granite_plus_text_twin_is_the_granite_lm(tiny_granite_plus_dir):
    model, tok = _model(tiny_granite_plus_dir)
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris and more")]
    got = [ll for ll, _ in LSLM(pretrained=tiny_granite_plus_dir, device="cpu").loglikelihood([req(c, x) for c, x in pairs])]
    scale = model.config.text_config.logits_scaling
    expected = [_score(tok, lambda ids: model(**ids).logits / scale, c, x) for c, x in pairs]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_granite_plus_captures_speech_and_text_states(tiny_granite_plus_dir, tmp_path):
    model, tok = _model(tiny_granite_plus_dir)

    def hidden_states(prompt, audio):
        if audio is None:
            ids = tok(prompt, return_tensors="pt")
            kw = {}
        else:
            feats, n = _inputs(audio)
            ids = tok(prompt.replace("<audio>", "<|audio|>" * n), return_tensors="pt")
            kw = {"input_features": feats}
        with torch.no_grad():
            hs = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], output_hidden_states=True,
                       **kw).hidden_states
        where = (ids["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0].tolist()
        return [h[0] for h in hs], where

    check_capture(tiny_granite_plus_dir, tmp_path, hidden_states)


def test_granite_plus_interventions_are_exact_and_local(tiny_granite_plus_dir):
    check_interventions(tiny_granite_plus_dir)
