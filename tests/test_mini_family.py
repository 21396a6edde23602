"""The checkpoint family (issue 29) on a budget of seconds: features, training from scratch with a fixed
seed and a step schedule, snapshots at the asked steps, each one a loadable adapter of the mini model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

SENTENCES = [f"The {w} is on the table number {i}." for i, w in enumerate(
    "cat dog cup book pen lamp shoe box coat hat key ball bowl fork sock bell".split())]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from lmeval_speech.mini import family

    out = tmp_path_factory.mktemp("family")
    (out / "features").mkdir()
    (out / "features" / "corpus.json").write_text(json.dumps({"sentences": SENTENCES, "stats": {}}))
    assert family.main(["--out", str(out), "--utterances", "12", "--valid", "4", "--steps", "4",
                        "--save-at", "0,2,4", "--batch", "2"]) == 0
    return out


def test_snapshots_at_the_asked_steps_differ_and_load(family):
    from lmeval_speech.mini.build import build_mini
    from lmeval_speech.mini.family import TEMPERATURE, checkpoints

    record = json.loads((family / "family.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [0, 2, 4] and record["steps"] == 4
    states = {s: load_file(str(p)) for s, p in checkpoints(family)}
    assert all(float(st["ctc_temperature"]) == pytest.approx(TEMPERATURE) for st in states.values())
    trained = [k for k in states[0] if k != "ctc_temperature" and states[0][k].dtype.kind == "f"]
    assert trained and any(not np.array_equal(states[0][k], states[4][k]) for k in trained)  # trained between them
    assert all(np.array_equal(states[0]["vocab_ids"], states[s]["vocab_ids"]) for s in (2, 4))
    assert (family / "adapters" / "training.json").exists()
    built = build_mini(checkpoints(family)[-1][1])  # the mini model's own loader takes a family member
    assert (built / "config.json").exists()


def test_the_same_seed_gives_the_same_family(family, tmp_path):
    """Step-based schedule and seeded shuffles: a second run from the same features is bit-identical."""
    import shutil

    from lmeval_speech.mini import family as fam

    shutil.copytree(family / "features", tmp_path / "features")
    assert fam.main(["--out", str(tmp_path), "--utterances", "12", "--valid", "4", "--steps", "4",
                     "--save-at", "0,2,4", "--batch", "2"]) == 0
    for (s, a), (_, b) in zip(fam.checkpoints(family), fam.checkpoints(tmp_path)):
        x, y = load_file(str(a)), load_file(str(b))
        assert all(np.array_equal(x[k], y[k]) for k in x), s
