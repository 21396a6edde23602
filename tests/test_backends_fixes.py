"""Issue 31, item 5: what a reading of the backends found, each checked against transformers' own code
(the installed model classes and processor modules), never against the backend's own assumptions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tone
from lmeval_speech.models.lslm import LSLM
from test_backends import _score, save_tiny_phi4
from test_lslm import req

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
