"""Hidden-state capture: the right positions, the right numbers, safe files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from conftest import tone
from lmeval_speech.capture.store import CaptureCorruptError, CaptureReader, CaptureWriter
from lmeval_speech.models.lslm import LSLM

QUESTION = "What is the capital of France?"
TEXT_CTX = f"The following are questions (with answers) about geography.\n\nQuestion: {QUESTION}\nAnswer:"
SPEECH_CTX = "The following are questions (with answers) about geography.\n\nQuestion: <audio>\nAnswer:"


def mc_requests(task, ctx, doc_id, extra=None):
    out = []
    for i, choice in enumerate([" Paris", " Rome"]):
        a = (ctx, choice) + ((extra,) if extra else ())
        inst = Instance(request_type="loglikelihood", doc={"question": QUESTION}, arguments=a, idx=i,
                        metadata=(task, doc_id, 1))
        out.append(inst)
    return out


@pytest.fixture()
def captured(tiny_qwen2_audio_dir, tmp_path):
    audio = tone(1.3, seed=3)
    extra = {"audio": [{"array": audio, "sampling_rate": 16000}]}
    reqs = mc_requests("speech_mmlu_continuation_geo_speech", SPEECH_CTX, 7, extra) + mc_requests("speech_mmlu_continuation_geo_text", TEXT_CTX, 7)
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3, capture="tokens",
              capture_dir=str(tmp_path / "cap"), capture_layers="all")
    plain = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3).loglikelihood(reqs)
    res = lm.loglikelihood(reqs)
    return lm, reqs, res, plain, audio, tmp_path / "cap"


def test_capture_does_not_change_scores(captured):
    _, _, res, plain, _, _ = captured
    np.testing.assert_allclose([r[0] for r in res], [p[0] for p in plain], atol=1e-6)


def test_speech_states_equal_a_direct_forward_at_audio_positions(captured, tiny_qwen2_audio_dir):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    lm, _, _, _, audio, root = captured
    reader = CaptureReader(root)
    (rec,) = [r for r in reader.records if r["modality"] == "speech"]
    assert (rec["pair"], rec["doc_id"]) == ("speech_mmlu_continuation_geo", 7)
    arrays = reader.load(rec)

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(tiny_qwen2_audio_dir)
    prompt = SPEECH_CTX.replace("<audio>", "<|audio_bos|><|AUDIO|><|audio_eos|>")
    inputs = proc(text=prompt, audio=[audio], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
    where = (inputs["input_ids"][0] == model.config.audio_token_id).nonzero()[:, 0]
    expected = np.stack([h[0, where].mean(0).numpy() for h in hs])
    assert rec["n_positions"] == len(where)
    np.testing.assert_allclose(arrays["pooled"], expected, atol=1e-4)
    assert arrays["tokens"].shape == (len(hs), len(where), expected.shape[1])
    np.testing.assert_allclose(arrays["tokens"][-1].astype(np.float32), hs[-1][0, where].numpy(), atol=2e-2)


def test_text_states_cover_exactly_the_question_tokens(captured, tokenizer):
    lm, _, _, _, _, root = captured
    reader = CaptureReader(root)
    (rec,) = [r for r in reader.records if r["modality"] == "text"]
    enc = tokenizer(TEXT_CTX, return_offsets_mapping=True, add_special_tokens=False)
    start, end = TEXT_CTX.index(QUESTION), TEXT_CTX.index("\nAnswer:")
    ids = [t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if b > start and a < end]
    assert tokenizer.decode(ids).strip() == QUESTION  # the first word's token carries its leading space
    assert rec["n_positions"] == len(ids)
    emb = lm.backend_impl.embed_tokens(torch.tensor([ids]))[0].mean(0).detach().numpy()
    np.testing.assert_allclose(reader.load(rec)["pooled"][0], emb, atol=1e-5)


def test_only_first_choice_is_captured_and_rerun_resumes(captured):
    _, _, _, _, _, root = captured
    reader = CaptureReader(root)
    assert sorted((r["task"], r["doc_id"]) for r in reader.records) == [("speech_mmlu_continuation_geo_speech", 7), ("speech_mmlu_continuation_geo_text", 7)]
    writer = CaptureWriter(root)
    assert writer.has("speech_mmlu_continuation_geo_speech", 7) and writer.has("speech_mmlu_continuation_geo_text", 7) and not writer.has("speech_mmlu_continuation_geo_text", 8)


def test_truncated_shard_is_reported_with_its_path(captured):
    _, _, _, _, _, root = captured
    (shard,) = list(root.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    reader = CaptureReader(root)
    with pytest.raises(CaptureCorruptError, match=str(shard.name)):
        reader.load(reader.records[0])
    assert not list(root.glob(".*.tmp"))


def test_capture_requires_a_dir(tiny_qwen2_audio_dir):
    with pytest.raises(ValueError, match="capture_dir"):
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", capture="pooled")


@pytest.mark.parametrize("prefix_cache, passes", [(True, 1), (False, 2)])
def test_items_with_identical_prompts_are_both_captured(tiny_qwen2_audio_dir, tmp_path, prefix_cache, passes):
    """Two docs with the same question share one forward pass; each still gets its record."""
    reqs = mc_requests("speech_mmlu_continuation_geo_text", TEXT_CTX, 1) + mc_requests("speech_mmlu_continuation_geo_text", TEXT_CTX, 2)
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", capture="pooled", capture_dir=str(tmp_path / "c"),
              prefix_cache=prefix_cache)
    calls = []
    real = lm.backend_impl.run_decoder
    lm.backend_impl.run_decoder = lambda *a, **k: calls.append(1) or real(*a, **k)
    lm.loglikelihood(reqs)
    recs = CaptureReader(tmp_path / "c").records
    assert sorted(r["doc_id"] for r in recs) == [1, 2]
    # 4 requests: 1 shared context (prefix cache) or 2 distinct model inputs (whole sequences)
    assert len(calls) == passes


def test_token_states_beyond_float16_keep_float32(tmp_path):
    """Token states are stored as float16 to halve the disk, but float16 ends at 65504: an item whose
    states go beyond (LLMs' massive activations) keeps float32 instead of turning into inf, which
    the report would have to drop; an ordinary item stays float16."""
    from types import SimpleNamespace

    from lmeval_speech.capture.recorder import HiddenStateCapture

    cap = HiddenStateCapture("tokens", tmp_path / "c", n_layers=2, layers="all")
    rng = np.random.default_rng(0)
    for doc_id, scale in ((0, 1.0), (1, 1e5)):
        states = [torch.tensor(rng.standard_normal((3, 4)) * scale, dtype=torch.float32) for _ in range(3)]
        cap.add(SimpleNamespace(task_name="speech_toy_a_speech", doc_id=doc_id, idx=0), True, states, None)
        expected = torch.stack(states).numpy()
        if doc_id == 1:
            big = expected
    cap.flush()
    reader = CaptureReader(tmp_path / "c")
    loaded = {r["doc_id"]: reader.load(r) for r in reader.records}
    assert loaded[0]["tokens"].dtype == np.float16
    assert loaded[1]["tokens"].dtype == np.float32 and np.isfinite(loaded[1]["tokens"]).all()
    np.testing.assert_array_equal(loaded[1]["tokens"], big)


# ------------------------------------------- a capture dir or cache reused under other settings ----
# Both are keyed by item only: a second run skipped the items already there, so its report paired the
# first run's states (or cached scores) with the second run's numbers.

def test_a_capture_dir_made_under_other_settings_is_refused(captured, tiny_qwen2_audio_dir):
    _, reqs, _, _, _, root = captured
    kw = {"pretrained": tiny_qwen2_audio_dir, "device": "cpu", "batch_size": 3, "capture": "tokens",
          "capture_dir": str(root), "capture_layers": "all"}
    with pytest.raises(ValueError, match=r"other settings \(tts_override=None\).*tts_override=\{'rate': 200\}"):
        LSLM(tts_rate=200, **kw)
    with pytest.raises(ValueError, match="noise="):
        LSLM(noise="white", snr_db=10, **kw)
    LSLM(**kw).loglikelihood(reqs)  # the same settings resume (nothing new to capture)


def test_a_capture_dir_reused_with_other_capture_layers_is_refused(captured, tiny_qwen2_audio_dir):
    """capture.json was rewritten to the new layers while the earlier records hold others: the report
    then averaged APS over a mix of layers with no note (issue 33)."""
    _, reqs, _, _, _, root = captured
    kw = {"pretrained": tiny_qwen2_audio_dir, "device": "cpu", "batch_size": 3, "capture": "tokens",
          "capture_dir": str(root)}
    before = (root / "capture.json").read_bytes()
    with pytest.raises(ValueError, match=r"holds token states of hidden states \[0, 1, 2\]; this run captures \[1\]"):
        LSLM(capture_layers="1", **kw)
    assert (root / "capture.json").read_bytes() == before
    LSLM(capture_layers="all", **kw).loglikelihood(reqs)  # the same layers resume


def test_a_captured_item_from_another_prompt_is_refused_not_reused(captured, tiny_qwen2_audio_dir):
    from lmeval_speech.capture.store import CaptureInputMismatch

    _, _, _, _, _, root = captured
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3, capture="tokens",
              capture_dir=str(root), capture_layers="all")
    other = mc_requests("speech_mmlu_continuation_geo_text", TEXT_CTX.replace("geography", "history"), 7)
    with pytest.raises(CaptureInputMismatch, match="speech_mmlu_continuation_geo_text/7 captured from another model input"):
        lm.loglikelihood(other)


def test_a_use_cache_database_made_under_other_settings_is_refused(tiny_qwen2_audio_dir, tmp_path):
    from lm_eval.api.model import CachingLM

    reqs = mc_requests("speech_mmlu_continuation_geo_text", TEXT_CTX, 7)
    path = str(tmp_path / "cache_rank0.db")
    first = CachingLM(LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3), path)
    scores = first.loglikelihood(reqs)
    first.dbdict.close()
    again = CachingLM(LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3), path)
    assert again.loglikelihood(reqs) == scores  # same model and settings: taken from the cache
    again.dbdict.close()
    with pytest.raises(ValueError, match=r"other settings \(noise=None\); this run has noise=\{"):
        CachingLM(LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3, noise="white", snr_db=5), path)
    with pytest.raises(ValueError, match="max_audio_seconds=300.0.*max_audio_seconds=10.0"):
        CachingLM(LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3, max_audio_seconds=10), path)
    from sqlitedict import SqliteDict

    foreign = SqliteDict(str(tmp_path / "hf_rank0.db"), autocommit=True)
    foreign["abc"] = (-1.0, False)  # a result some other model stored
    foreign.close()
    with pytest.raises(ValueError, match="holds 1 results made without lmeval_speech's record"):
        CachingLM(LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3), str(tmp_path / "hf_rank0.db"))


def test_a_use_cache_database_made_before_the_spoken_form_rules_changed_is_refused(tiny_qwen2_audio_dir, tmp_path,
                                                                                     monkeypatch):
    """The rules that rewrite TTS texts change the audio of the same request: an older database's
    speech scores are not this run's."""
    from lm_eval.api.model import CachingLM

    from lmeval_speech.audio.spoken_form import VERSION
    from lmeval_speech.models import record as lslm_module  # where lslm keeps its run conditions

    path = str(tmp_path / "cache_rank0.db")
    monkeypatch.setattr(lslm_module, "SPOKEN_FORM_VERSION", VERSION - 1)
    first = CachingLM(LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3), path)
    first.loglikelihood(mc_requests("speech_mmlu_continuation_geo_text", TEXT_CTX, 7))
    first.dbdict.close()
    monkeypatch.undo()
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3)
    assert lm.get_model_info()["lmeval_speech"]["settings"]["spoken_form"] == VERSION  # the results record it
    with pytest.raises(ValueError, match=rf"other settings \(spoken_form={VERSION - 1}\); this run has spoken_form={VERSION}"):
        CachingLM(lm, path)


def test_a_capture_dir_without_a_record_of_its_settings_is_refused(tmp_path):
    """A store written before conditions were recorded: its settings are unknown, so a run under any
    settings is refused (it used to be accepted and to overwrite capture.json with its own settings)."""
    old = CaptureWriter(tmp_path, meta={"mode": "pooled"})
    old.add({"task": "t_speech", "pair": "t", "modality": "speech", "doc_id": 0, "n_positions": 1,
             "token_layers": [], "audio": None}, {"pooled": np.zeros((2, 4), dtype=np.float32)})
    old.flush()
    with pytest.raises(ValueError, match="no record of the settings"):
        CaptureWriter(tmp_path, meta={"mode": "pooled"}, conditions={"noise": None})
    assert "conditions" not in CaptureReader(tmp_path).meta or CaptureReader(tmp_path).meta["conditions"] is None


def test_a_setting_missing_on_one_side_and_none_on_the_other_is_the_same_setting(tmp_path):
    """A newer version adds a setting whose default is None: a store made before it holds records of
    the same effective settings. Both stores agree (the capture dir raised TypeError, the cache accepted)."""
    from lmeval_speech.capture.store import check_conditions, mismatch

    check_conditions(tmp_path, {"noise": None}, {"noise": None, "new_setting": None}, has_records=True)
    assert mismatch({"a": 1}, {"a": 1, "b": None}) is None
    assert mismatch({"a": 1}, {"a": 2, "b": 3}) == ("a=1, b=None", "a=2, b=3")
    with pytest.raises(ValueError, match="other settings \\(noise=None\\); this run has noise='white'"):
        check_conditions(tmp_path, {"noise": None}, {"noise": "white"}, has_records=True)


def test_a_tokenizer_without_offsets_stops_capture_with_one_clear_error(tiny_qwen2_audio_dir, tmp_path, monkeypatch):
    """Voxtral's mistral-common tokenizer (wrapped) cannot be called for offsets: the run died with
    ``TypeError: '_ControlTokenText' object is not callable`` at the first text twin."""
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", capture="pooled", capture_dir=str(tmp_path / "c"))

    def no_offsets(self, *a, **k):
        raise TypeError("'_ControlTokenText' object is not callable")

    monkeypatch.setattr(type(lm.tokenizer), "__call__", no_offsets)
    with pytest.raises(ValueError, match="gives no character offsets"):
        lm.loglikelihood(mc_requests("speech_mmlu_continuation_geo_text", TEXT_CTX, 1))
