"""The logit lens (models/lens.py at capture, metrics/lens.py and report/lens.py in the report): its ranks
against a direct forward of the embedded model's own LLM, the summary by hand."""

import glob
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from lmeval_speech.metrics.lens import aligned_ranks, summarize
from lmeval_speech.models.lens import RANK_CAP


def test_aligned_ranks_and_summary_by_hand():
    ranks = np.array([[0, 5, 40], [3, 0, 9], [7, 12, 0]])  # [P=3, Q=3]
    assert aligned_ranks(ranks, [0, 0, 1]).tolist() == [0, 5, 9]  # token q read at its aligned position
    s = summarize([np.array([0, 5, 9]), np.array([0, 20])])
    assert s["top1"] == pytest.approx(2 / 5) and s["top10"] == pytest.approx(4 / 5)
    assert s["mean_rank"] == pytest.approx(34 / 5) and s["median_rank"] == 5 and s["n_tokens"] == 5
    assert summarize([])["top1"] is None


@pytest.mark.slow
def test_lens_ranks_are_the_models_own_and_the_report_counts_them(tmp_path):
    """A capture=tokens run of the embedded model on 3 ARC-Easy items: each text record's lens ranks equal
    ranks recomputed here from a plain ``LlamaForCausalLM`` forward of the prompt (the final norm and head
    on ``output_hidden_states``; at the last index the model's own next-token logits), the speech
    records rank the same question tokens, and the report's lens section reads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmeval_speech.mini.build import smollm2_fp32_dir
    from lmeval_speech.report import report

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cap, out = tmp_path / "cap", tmp_path / "res"
    proc = subprocess.run(["lm_eval", "--model", "lslm", "--model_args",
                           f"pretrained=mini,capture=tokens,capture_dir={cap},capture_layers=0/15/30",
                           "--tasks", "speech_arc_easy", "--limit", "3", "--batch_size", "8", "--device", "cpu",
                           "--log_samples", "--output_path", str(out)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from lmeval_speech.capture.store import CaptureReader

    reader = CaptureReader(cap)
    llm = AutoModelForCausalLM.from_pretrained(smollm2_fp32_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_fp32_dir())
    (samples,) = glob.glob(str(out / "*" / "samples_speech_arc_easy_text_*.jsonl"))
    contexts = {r["doc_id"]: r["arguments"]["gen_args_0"]["arg_0"] for r in map(json.loads, open(samples))}
    by_key = {(r["modality"], r["doc_id"]): r for r in reader.records}
    checked = 0
    for (modality, doc_id), rec in by_key.items():
        if modality != "text":
            continue
        arrays = reader.load(rec)
        ids, ranks = arrays["lens_ids"].tolist(), arrays["lens_ranks"]
        prompt = tok(contexts[doc_id])["input_ids"]
        start = next(i for i in range(len(prompt)) if prompt[i:i + len(ids)] == ids)
        with torch.no_grad():
            hs = llm(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        for k, index in enumerate(rec["token_layers"]):
            h = hs[index][0, start:start + len(ids)]
            logits = llm.lm_head(h if index == len(hs) - 1 else llm.model.norm(h)).float()
            want = torch.stack([(logits > logits[:, [t]]).sum(-1) for t in ids], dim=1).clamp(max=RANK_CAP)
            # the run's batched pass and this single pass differ by float rounding (~1e-5), which can swap
            # near-tied logits: ranks agree to within a few places (a wrong norm or head moves them by thousands)
            want = want.numpy()
            assert (np.abs(ranks[k] - want) <= 2 + 0.002 * want).all(), (doc_id, index)
            assert np.mean(ranks[k] == want) > 0.8, (doc_id, index)
        # the last index is the model's own next-token distribution: token q+1's rank at position q
        own = torch.log_softmax(llm(torch.tensor([prompt])).logits[0].float(), -1)[start:start + len(ids) - 1]
        nxt = [min(RANK_CAP, (own[q] > own[q, ids[q + 1]]).sum().item()) for q in range(len(ids) - 1)]
        got = np.array([int(ranks[-1][q, q + 1]) for q in range(len(ids) - 1)])
        assert (np.abs(got - np.array(nxt)) <= 2 + 0.002 * np.array(nxt)).all(), (got, nxt)
        speech = reader.load(by_key[("speech", doc_id)])
        assert speech["lens_ids"].tolist() == ids and speech["lens_ranks"].shape[2] == len(ids)
        checked += 1
    assert checked == 3
    rep, _ = report.build_report(report.load_run(out), n_boot=200)
    lens = rep["logit_lens"]
    assert lens["layers"] == [0, 15, 30] and lens["n_items"] == 3 and lens["vocab_size"] == 49152
    # the embeddings of this tied-embedding LLM decode to their own token: the text reference is high there
    assert lens["text"]["top1"][0] > 0.5 and lens["chance"]["top1"] == pytest.approx(1 / 49152)
    assert "Logit lens" in report.markdown(rep)
