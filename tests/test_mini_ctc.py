"""The CTC / LegoSLM adapter of the mini model, on tiny configs (fast: no real weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, WhisperConfig

from lmeval_speech.mini.modeling import MiniCTCProjector, MiniLSLMConfig


def tiny_projector(vocab=(3, 5, 7), residual=False):
    cfg = MiniLSLMConfig(audio_config=WhisperConfig(d_model=8, encoder_layers=1, encoder_attention_heads=2),
                         text_config=LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                                 intermediate_size=32, vocab_size=10),
                         adapter_type="ctc", ctc_layers=1, ctc_vocab_size=len(vocab), ctc_residual=residual)
    proj = MiniCTCProjector(cfg).eval()
    proj.vocab_ids.copy_(torch.tensor(vocab))
    return proj


def test_speech_embeddings_drop_blanks_and_merge_repeats(monkeypatch):
    proj = tiny_projector()
    emb = torch.randn(10, 16)
    # frames' best classes: blank, tok0, tok0, blank, tok0, tok2, tok2, blank  -> tok0 | tok0 | tok2
    best = [3, 0, 0, 3, 0, 2, 2, 3]
    logits = torch.full((8, 4), -20.0)
    for i, b in enumerate(best):
        logits[i, b] = 5.0
    monkeypatch.setattr(proj, "ctc_logits", lambda h, e: logits)
    out = proj.speech_embeddings(torch.zeros(8, 16), emb)
    assert out.shape == (3, 16)
    torch.testing.assert_close(out, emb[[3, 3, 7]], atol=1e-4, rtol=1e-4)


def test_residual_adds_its_map_of_the_frames_mean_to_each_merged_position(monkeypatch):
    """Stage 2's residual: position k gets residual(mean of the adapter outputs of the frames merged into
    it); zero weights give exactly the stage-1 embeddings."""
    proj = tiny_projector(residual=True)
    emb = torch.randn(10, 16)
    best = [3, 0, 0, 3, 0, 2, 2, 3]  # -> tok0 (frames 1, 2) | tok0 (frame 4) | tok2 (frames 5, 6)
    logits = torch.full((8, 4), -20.0)
    for i, b in enumerate(best):
        logits[i, b] = 5.0
    monkeypatch.setattr(proj, "ctc_logits", lambda h, e: logits)
    h = torch.randn(8, 16)
    torch.nn.init.zeros_(proj.residual.weight)
    torch.nn.init.zeros_(proj.residual.bias)
    torch.testing.assert_close(proj.speech_embeddings(h, emb), emb[[3, 3, 7]], atol=1e-4, rtol=1e-4)
    torch.nn.init.normal_(proj.residual.weight)
    torch.nn.init.normal_(proj.residual.bias)
    with torch.no_grad():
        want = emb[[3, 3, 7]] + proj.residual(torch.stack([h[1:3].mean(0), h[4], h[5:7].mean(0)]))
        got = proj.speech_embeddings(h, emb)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_greedy_transcript_collapses_runs_drops_blanks_and_maps_to_llm_ids():
    from lmeval_speech.mini.modeling import ctc_collapse

    # frame classes of a 3-token subset (blank = 3): runs merge, a blank separates a repeated token
    assert ctc_collapse([3, 0, 0, 3, 0, 2, 2, 1, 3, 3], 3) == [0, 0, 2, 1]
    proj = tiny_projector(vocab=(3, 5, 7))
    assert proj.vocab_ids[ctc_collapse([1, 1, 3, 2], 3)].tolist() == [5, 7]


def test_corpus_wer_counts_errors_over_all_reference_words():
    from lmeval_speech.audio.asr import corpus_wer

    # 1 substitution in 4 words + 1 deletion in 2 words = 2 / 6 (a mean of per-item WERs would give 0.375)
    assert corpus_wer(["What is the capital?", "Hello world"], ["what is a capital", "hello"]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        corpus_wer(["a"], [])


def test_speech_embeddings_never_empty(monkeypatch):
    proj = tiny_projector()
    logits = torch.zeros(5, 4)
    logits[:, 3] = 10.0
    logits[2, 3] = 1.0  # the least-blank frame is kept
    logits[2, 1] = 0.5
    monkeypatch.setattr(proj, "ctc_logits", lambda h, e: logits)
    out = proj.speech_embeddings(torch.zeros(5, 16), torch.randn(10, 16))
    assert out.shape == (1, 16)


def test_ctc_logits_bf16_close_to_fp32():
    proj = tiny_projector()
    emb = torch.randn(10, 16)
    h = proj(torch.randn(2, 10, 8))
    full = proj.ctc_logits(h, emb)
    fast = proj.ctc_logits(h, vocab_emb=emb[proj.vocab_ids].bfloat16())
    assert full.shape == (2, 2, 4) and full.dtype == torch.float32
    torch.testing.assert_close(fast, full, atol=0.1, rtol=0.05)


def test_vocabulary_embeddings_are_kept_only_while_the_weight_is_unchanged():
    """The gathered vocabulary rows are kept between clips (a 32k x 576 gather per clip cost more
    than the adapter), but a changed weight (in place, or another tensor) or vocabulary must be seen:
    the output always equals the one computed from scratch."""
    proj = tiny_projector()
    emb = torch.randn(10, 16)
    h = proj(torch.randn(1, 10, 8))[0]

    def fresh(weight):
        post = torch.softmax(torch.cat([h @ weight[proj.vocab_ids].T, proj.blank(h)], -1) / proj.temperature, -1)
        return post

    with torch.no_grad():
        first = proj.speech_embeddings(h, emb)
        torch.testing.assert_close(proj.ctc_logits(h, emb).softmax(-1), fresh(emb))
        emb[5] += 3.0  # in place: same storage, new version
        torch.testing.assert_close(proj.ctc_logits(h, emb).softmax(-1), fresh(emb))
        assert not torch.equal(proj.speech_embeddings(h, emb), first)
        other = torch.randn(10, 16)
        torch.testing.assert_close(proj.ctc_logits(h, other).softmax(-1), fresh(other))
        proj.vocab_ids.copy_(torch.tensor([1, 2, 4]))
        torch.testing.assert_close(proj.ctc_logits(h, other).softmax(-1), fresh(other))
    assert proj.vocab_embeddings(other, torch.float32) is proj.vocab_embeddings(other, torch.float32)  # kept


def test_mel_on_clip_equals_padded_then_cropped():
    from transformers import WhisperFeatureExtractor

    from lmeval_speech.mini.features import check_mel_equivalence

    rng = np.random.default_rng(0)
    fe = WhisperFeatureExtractor(feature_size=80)
    for n in (1234, 16000, 37483):
        assert check_mel_equivalence(fe, (0.1 * rng.standard_normal(n)).astype(np.float32)) < 1e-5


def test_corpus_filter_and_decontamination_rule():
    from lmeval_speech.mini.corpus import good_sentence, ngrams

    assert good_sentence("The quick brown fox jumps over the lazy dog.")
    assert not good_sentence("Use foo_bar(x) to call it now.")
    assert not good_sentence("Too short.")
    q = "Which of the following is the body cavity that contains the pituitary gland?"
    s = "Remember: which of the following is the body cavity that holds it."
    assert ngrams(q) & ngrams(s)  # 8 shared consecutive words: dropped
    assert not ngrams(q) & ngrams("The body cavity contains many glands of the following kinds.")


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 1, 1]])
def test_derangement_has_no_fixed_point(groups):
    from lmeval_speech.mini.evaluate import derangement

    perm = derangement(5, groups)
    assert all(p != i for i, p in enumerate(perm)) and sorted(perm) == list(range(5))


def test_posterior_temperature_is_stored_in_the_adapter_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from lmeval_speech.mini.build import set_adapter_temperature

    state = {"blank.weight": torch.randn(4), "vocab_ids": torch.tensor([3, 5, 7])}
    path = tmp_path / "adapter.safetensors"
    save_file(state, str(path))
    set_adapter_temperature(path, 0.35)
    got = load_file(str(path))
    assert got.pop("ctc_temperature").item() == pytest.approx(0.35)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind
    save_file({"linear.weight": torch.zeros(2)}, str(tmp_path / "mlp.safetensors"))
    with pytest.raises(ValueError, match="not a CTC adapter"):
        set_adapter_temperature(tmp_path / "mlp.safetensors", 0.5)


def test_new_feature_shards_are_picked_up_after_a_resume_at_any_step(tmp_path):
    """The loop checks once per pool (4 batches); a resume at step 5,457 never met ``step % 200 == 0``,
    so the shards the featurizer wrote during the run were never read."""
    from lmeval_speech.mini.train import REFRESH_EVERY, ShardSet, refresh_due

    checks, last, refreshed = range(5457, 5457 + 4 * 300, 4), 5457, []
    for step in checks:
        if refresh_due(step, last):
            last = step
            refreshed.append(step)
    assert refreshed[0] == 5457 + REFRESH_EVERY and len(refreshed) == 5 and all(b - a == REFRESH_EVERY for a, b in zip(refreshed, refreshed[1:]))
    # and a re-scan reads a shard written after the set was opened
    folder = tmp_path / "train"
    folder.mkdir()

    def shard(name, texts):
        np.save(folder / f"{name}.npy", np.zeros((5 * len(texts), 384), dtype=np.float16))
        (folder / f"{name}.json").write_text(json.dumps({"offsets": [5 * i for i in range(len(texts) + 1)],
                                                         "items": [{"text": t} for t in texts]}))
    shard("shard00000", ["a b c d e."])
    train = ShardSet(folder)
    shard("shard00001", ["f g h i j.", "k l m n o."])
    assert len(train) == 1 and train.refresh() == 2 and len(train) == 3


def test_training_checkpoint_round_trips_without_pickle(tmp_path):
    """A checkpoint is one safetensors file with JSON metadata: weights, AdamW moments, both RNG states
    and the loop's state come back exactly, so a resumed step equals the uninterrupted one."""
    import random

    from lmeval_speech.mini.train import (
        CKPT_NAME,
        load_checkpoint,
        restore_checkpoint,
        save_checkpoint,
    )

    def make():
        torch.manual_seed(0)
        proj = tiny_projector()
        return proj, torch.optim.AdamW(proj.parameters(), lr=1e-2, weight_decay=0.01)

    def step(proj, opt):
        x = torch.randn(2, 10, 8)  # draws from torch's RNG: a restored RNG must give the same batch
        loss = proj(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    proj, opt = make()
    proj.train()
    rng = random.Random(3)
    for _ in range(2):
        step(proj, opt)
    rng.random()
    state = {"step": 2, "losses": [1.5, 0.25], "valid": [{"step": 2, "ter": 0.5}]}
    save_checkpoint(tmp_path, proj, opt, state, rng)
    assert [p.name for p in tmp_path.iterdir()] == [CKPT_NAME]  # atomic: no temp file left
    assert (tmp_path / CKPT_NAME).read_bytes()[:2] != b"\x80\x04"  # not a pickle stream
    step(proj, opt)
    want_py = rng.random()

    ck = load_checkpoint(tmp_path)
    proj2, opt2 = make()
    proj2.train()
    rng2 = random.Random()
    assert restore_checkpoint(ck, proj2, opt2, rng2) == state
    step(proj2, opt2)
    assert rng2.random() == want_py
    for (k, a), b in zip(proj.state_dict().items(), proj2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert load_checkpoint(tmp_path / "none") is None


class _Hostile:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_resume_never_unpickles_an_old_checkpoint(tmp_path):
    """``train --resume`` ran ``torch.load(weights_only=False)`` on ``ckpt.pt``: a file in the checkpoint
    folder could run code. The old format is refused with one clear error, and nothing is unpickled."""
    from lmeval_speech.mini import train

    feats, ck = tmp_path / "features", tmp_path / "ckpt"
    (feats / "train").mkdir(parents=True)
    (feats / "valid").mkdir()
    (feats / "corpus.json").write_text(json.dumps({"sentences": ["A small test sentence here."], "stats": {}}))
    ck.mkdir()
    _Hostile.marker = tmp_path / "ran"
    torch.save({"x": _Hostile()}, ck / "ckpt.pt")
    with pytest.raises(SystemExit, match="pickle"):
        train.main(["--resume", "--features", str(feats), "--ckpt-dir", str(ck), "--out", str(tmp_path / "out"),
                    "--max-steps", "0"])
    assert not _Hostile.marker.exists()


def test_stage_one_can_start_from_the_shipped_adapter(tmp_path):
    """A fresh machine has no training checkpoint (it stays on the machine that trained): ``--init``
    starts from an adapter file's weights and vocabulary; with no step taken, the written adapter is it."""
    from safetensors.torch import load_file

    from lmeval_speech.mini import train
    from lmeval_speech.mini.build import ADAPTER_FILE

    feats = tmp_path / "features"
    (feats / "train").mkdir(parents=True)
    (feats / "valid").mkdir()
    (feats / "corpus.json").write_text(json.dumps({"sentences": ["A small test sentence here."], "stats": {}}))
    out = tmp_path / "out"
    train.main(["--init", str(ADAPTER_FILE), "--features", str(feats), "--ckpt-dir", str(tmp_path / "ck"),
                "--out", str(out), "--max-steps", "0"])
    shipped, written = load_file(str(ADAPTER_FILE)), load_file(str(out / "adapter.safetensors"))
    shipped.pop("ctc_temperature")
    assert written.keys() == shipped.keys() and all(torch.equal(written[k], shipped[k]) for k in shipped)


def test_stage_one_can_grow_the_shipped_adapter_deeper_starting_from_the_same_function(tmp_path):
    """``--init ADAPTER --layers 4`` on a 2-layer adapter: the two new layers start as the identity, so the
    grown adapter computes exactly what the shipped one does (training then only has to improve on it)."""
    from safetensors.torch import load_file

    from lmeval_speech.mini import train
    from lmeval_speech.mini.build import ADAPTER_FILE

    feats = tmp_path / "features"
    (feats / "train").mkdir(parents=True)
    (feats / "valid").mkdir()
    (feats / "corpus.json").write_text(json.dumps({"sentences": ["A small test sentence here."], "stats": {}}))
    out = tmp_path / "out"
    train.main(["--init", str(ADAPTER_FILE), "--layers", "4", "--features", str(feats), "--ckpt-dir",
                str(tmp_path / "ck"), "--out", str(out), "--max-steps", "0"])
    shipped, grown = load_file(str(ADAPTER_FILE)), load_file(str(out / "adapter.safetensors"))
    shipped.pop("ctc_temperature")
    assert train.init_layers(shipped) == 2 and train.init_layers(grown) == 4
    projs = []
    for state in (shipped, grown):
        proj = MiniCTCProjector(train.make_config(int(state["vocab_ids"].numel()), train.init_layers(state))).eval()
        proj.load_state_dict(state)
        projs.append(proj)
    frames = torch.randn(2, 40, 384)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        a, b = projs[0](frames, pad), projs[1](frames, pad)
    torch.testing.assert_close(a[~pad], b[~pad], atol=1e-5, rtol=1e-5)
    assert any(t.abs().sum() > 0 for k, t in grown.items() if k.startswith("layers.3."))  # not an empty layer


def test_featurizer_parts_split_the_shards_between_processes(tmp_path, monkeypatch):
    """``features --part R/K``: K processes on K cores encode disjoint shards (index R modulo K), and
    together every shard once; each utterance is the encoder's output on its TTS audio."""
    from lmeval_speech.mini import features

    monkeypatch.setattr(features, "SHARD", 2)
    monkeypatch.setattr(features, "N_VALID", 1)
    sentences = ["The cat sat on the mat.", "Water boils at one hundred degrees.", "Birds can fly.",
                 "Trees grow slowly.", "Rivers flow to the sea."]
    (tmp_path / "corpus.json").write_text(json.dumps({"sentences": sentences, "stats": {}}))
    base = ["--out", str(tmp_path), "--passes", "1"]
    features.main(base + ["--part", "1/2"])
    assert sorted(p.name for p in (tmp_path / "train").glob("*.json")) == ["shard00001.json"]
    assert not list((tmp_path / "valid").glob("*.json"))  # valid has one shard, index 0
    features.main(base + ["--part", "0/2"])
    assert sorted(p.name for p in (tmp_path / "train").glob("*.json")) == ["shard00000.json", "shard00001.json"]
    texts = [it["text"] for k in (0, 1) for it in json.loads((tmp_path / "train" / f"shard0000{k}.json").read_text())["items"]]
    assert sorted(texts) == sorted(features.plan(sentences, 0, 1)[1][i]["text"] for i in range(4))
    with pytest.raises(SystemExit, match="R must be"):
        features.main(base + ["--part", "2/2"])


def test_stage_one_never_writes_over_its_init_adapter(tmp_path):
    """``train --init weights/adapter.safetensors`` with the default ``--out`` (that folder) would rewrite the
    shipped adapter at the first checkpoint, without its posterior temperature."""
    from lmeval_speech.mini import train
    from lmeval_speech.mini.build import ADAPTER_FILE

    before = ADAPTER_FILE.read_bytes()
    with pytest.raises(SystemExit, match="holds the --init adapter"):
        train.main(["--init", str(ADAPTER_FILE), "--features", str(tmp_path), "--max-steps", "0"])
    assert ADAPTER_FILE.read_bytes() == before


def test_an_adapter_without_residual_keeps_its_config_and_so_its_model_identity():
    """The model identity hashes the config: a new always-present key would have changed every existing
    mini run's identity (its capture dirs and --use_cache databases refused after an upgrade)."""
    plain = MiniLSLMConfig(adapter_type="ctc").to_dict()
    assert "ctc_residual" not in plain
    assert MiniLSLMConfig(adapter_type="ctc", ctc_residual=True).to_dict()["ctc_residual"] is True
