"""Issue 30: one record of the run conditions and one list of which guard compares each
(``lmeval_speech/conditions.py``). A condition added in one place is refused by every guard on a mismatch."""

from __future__ import annotations

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import CachingLM

from lmeval_speech import conditions as cond
from lmeval_speech.models.lslm import LSLM


@pytest.fixture
def new_condition(monkeypatch):
    """A new condition ``new_setting``, compared across models too: its entry in the list, and its value
    where ``RunRecord.conditions`` records the values (wrapped here, as a new line there would)."""
    import lmeval_speech.models.record as record

    value = {"v": "A"}
    monkeypatch.setitem(cond.CONDITIONS, "new_setting", True)
    monkeypatch.setattr(record, "check_listed", lambda c: cond.check_listed({**c, "new_setting": value["v"]}))
    return value


def test_a_condition_not_in_the_list_is_refused():
    with pytest.raises(KeyError, match="not listed"):
        cond.check_listed({**{k: None for k in cond.CONDITIONS}, "unlisted": 1})
    assert cond.across_models({k: k for k in cond.CONDITIONS}) == {"noise": "noise", "intervention": "intervention",
                                                                         "spoken_form": "spoken_form"}


def test_a_new_condition_is_compared_by_every_guard(tiny_llama_dir, tmp_path, new_condition):
    from lmeval_speech.capture.store import CaptureWriter
    from lmeval_speech.report import compare
    from lmeval_speech.report.compute import _check_capture

    lm = LSLM(pretrained=tiny_llama_dir, device="cpu")
    first = lm.conditions()
    assert first["new_setting"] == "A" and lm.get_model_info()["lmeval_speech"]["conditions"] == first
    new_condition["v"] = "B"
    second = lm.conditions()
    # the capture store
    w = CaptureWriter(tmp_path / "cap", conditions=first, meta={"mode": "pooled"})
    w.add({"task": "p_text", "pair": "p", "modality": "text", "doc_id": 0}, {"pooled": np.zeros((2, 3), np.float32)})
    w.flush()
    with pytest.raises(ValueError, match="new_setting"):
        CaptureWriter(tmp_path / "cap", conditions=second)
    # lm-eval's --use_cache database
    db = str(tmp_path / "cache.db")
    new_condition["v"] = "A"
    CachingLM(LSLM(pretrained=tiny_llama_dir, device="cpu"), db).loglikelihood(
        [Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0)])
    new_condition["v"] = "B"
    with pytest.raises(ValueError, match="new_setting"):
        CachingLM(LSLM(pretrained=tiny_llama_dir, device="cpu"), db)
    # the report: a capture read beside a run's scores
    reader = type("R", (), {"meta": {"model": {"pretrained": "m"}, "conditions": first}})()
    run = {"results": {"config": {"lmeval_speech": {"model": {"pretrained": "m"}, "conditions": second}}}}
    with pytest.raises(ValueError, match="conditions.new_setting='A'"):
        _check_capture(reader, run, {"model_args": {}}, "cap", [])
    # compare and check (check refuses what compare's 'conditions' aspect finds)
    assert compare._conditions({"conditions": first}) != compare._conditions({"conditions": second})
    assert compare._conditions({"conditions": second})["new_setting"] == "B"
