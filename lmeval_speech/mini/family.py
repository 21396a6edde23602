"""Owns the checkpoint family: one adapter trained from scratch with a fixed seed, saved at steps spaced
so that hearing spreads from none to the shipped model's (the paper's regression across checkpoints).

    python -m lmeval_speech.mini.family --out DIR [--utterances 6000] [--steps 1600] \\
        [--save-at 0,25,50,100,200,400,800,1600] [--seed 0] [--resume]

Two stages, each resumable (rerun the same command, with ``--resume`` once training has started):

1. features (:mod:`.features`): the first ``--utterances`` training sentences of the corpus (decontaminated
   against MMLU, the easy checks and the science sets), one espeak-ng voice each, plus the 300 held-out
   sentences, encoded by the frozen Whisper tiny.en encoder into ``DIR/features``;
2. training (:mod:`.train`) from a random initialisation with seed ``--seed``, a cosine schedule over
   ``--steps`` *steps* (not minutes: the same run on any machine), writing ``adapter_step<N>.safetensors``
   at every ``--save-at`` step into ``DIR/adapters`` (step 0 is the untrained adapter), all with the
   shipped posterior temperature, so checkpoints differ only in training.

``DIR/family.json`` lists the checkpoints and the held-out token error rates the training measured. The
shipped adapter (12,314 steps on 67,071 utterances) is the family's last member by reference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .build import ADAPTER_FILE

SAVE_AT = "0,25,50,100,200,400,800,1600"
#: the shipped adapter's posterior temperature (chosen on the development set, MODEL_CARD.md)
TEMPERATURE = 0.7


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, file) of every adapter the family has written so far, by step."""
    found = [(int(p.stem.removeprefix("adapter_step")), p) for p in (out / "adapters").glob("adapter_step*.safetensors")]
    return sorted(found)


def main(argv=None) -> int:
    from . import features, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--utterances", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--save-at", default=SAVE_AT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--valid", type=int, default=300, help="held-out sentences for the token error rate")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue the training from DIR/ckpt")
    args = ap.parse_args(argv)
    save_at = sorted({int(x) for x in args.save_at.split(",") if x.strip()})
    if save_at and save_at[-1] > args.steps:
        raise SystemExit(f"--save-at {save_at[-1]} is past --steps {args.steps}")
    t0 = time.time()
    features.main(["--out", str(args.out / "features"), "--passes", "1", "--max-items", str(args.utterances),
                   "--seed", str(args.seed), "--valid", str(args.valid)])
    t_features = time.time() - t0
    train.main(["--features", str(args.out / "features"), "--ckpt-dir", str(args.out / "ckpt"),
                "--out", str(args.out / "adapters"), "--seed", str(args.seed), "--batch", str(args.batch),
                "--schedule-steps", str(args.steps), "--max-steps", str(args.steps), "--minutes", "1e9",
                "--warmup", str(max(1, min(300, args.steps // 10))), "--eval-every", str(max(1, args.steps // 8)),
                "--save-at", ",".join(map(str, save_at)), "--temperature", str(TEMPERATURE),
                "--threads", str(args.threads), *(["--resume"] if args.resume else [])])
    stats = json.loads((args.out / "adapters" / "training.json").read_text())
    record = {"seed": args.seed, "utterances": args.utterances, "steps": args.steps, "save_at": save_at,
              "temperature": TEMPERATURE, "features_seconds": round(t_features, 1),
              "total_seconds": round(time.time() - t0, 1),
              "valid_token_error_rate": stats.get("valid_token_error_rate"),
              "checkpoints": [{"step": s, "file": str(p.relative_to(args.out))} for s, p in checkpoints(args.out)],
              "shipped": {"file": str(ADAPTER_FILE), "steps": 12314}}
    (args.out / "family.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
