"""Speech features for training the mini adapter: TTS -> mel -> frozen Whisper encoder, cached in shards.

Each utterance costs ~60 ms of CPU (espeak-ng, mel, Whisper tiny.en encoder on the clip's real
length), so encoder outputs are computed once and stored as fp16 ``.npy`` shards (memory-mapped by
the trainer) with a JSON sidecar (texts, TTS specs, frame offsets). Shards are written atomically,
so the trainer can pick up new shards while this runs:

    nice -n 10 python -m lmeval_speech.mini.features --out ~/.cache/lmeval_speech/ctc_features

The mel is computed on the clip plus zero samples up to the cropped window, not on a zero-padded
30 s window: Whisper's log-mel is clamped against its global maximum, which zeros never reach, so
the cropped frames are identical (checked by ``check_mel_equivalence``) at a fraction of the cost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmeval_speech.audio import TTSSpec
from lmeval_speech.audio.tts import render

FRAMES_PER_TOKEN = 10
HOP = 160
SHARD = 256
EVAL_SPEC = TTSSpec(engine="espeak-ng", voice="en-us", rate=160)
# Training voices: several espeak-ng voices and variants, 135-190 words/min; the evaluation voice
# (en-us at 160) is one of them but not the majority.
VOICES = ["en-us", "en-us", "en-us+m3", "en-us+f2", "en-us+f4", "en-us+m7", "en-gb", "en-us-nyc", "en-gb-x-rp", "en-029"]
RATES = [135, 150, 160, 160, 175, 190]
N_VALID = 300


def cropped_mel(audio: np.ndarray, fe) -> torch.Tensor:
    """``[n_mels, 10 * n_tok]`` log-mel of a 16 kHz clip, equal to the padded-then-cropped features."""
    n_mel = min(math.ceil(len(audio) / HOP), 3000)
    n_tok = max(1, math.ceil(n_mel / FRAMES_PER_TOKEN))
    width = n_tok * FRAMES_PER_TOKEN
    padded = np.zeros(max(len(audio), width * HOP) + 800, dtype=np.float32)
    padded[: len(audio)] = audio[: len(padded)]
    feats = fe([padded], sampling_rate=16000, padding="do_not_pad", return_tensors="pt")["input_features"][0]
    return feats[:, :width]


def load_encoder():
    from lmeval_speech.audio.whisper_ct2 import load_whisper_encoder_from_ct2

    enc = load_whisper_encoder_from_ct2(dtype=torch.float32).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


@torch.no_grad()
def encode(tower, mel: torch.Tensor) -> torch.Tensor:
    """The frozen Whisper encoder on a cropped window, exactly as ``MiniLSLMForConditionalGeneration.encode_frames``."""
    x = nn.functional.gelu(tower.conv1(mel[None].to(tower.conv1.weight.dtype)))
    x = nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)
    x = x + tower.embed_positions.weight[: x.shape[1]]
    for layer in tower.layers:
        x = layer(x, attention_mask=None)
        x = x[0] if isinstance(x, tuple) else x
    return tower.layer_norm(x)[0]


def check_mel_equivalence(fe, audio: np.ndarray) -> float:
    full = fe([audio], sampling_rate=16000, padding="max_length", return_tensors="pt")["input_features"][0]
    crop = cropped_mel(audio, fe)
    return float((full[:, : crop.shape[1]] - crop).abs().max())


def _write_shard(out: Path, idx: int, frames: list[np.ndarray], meta: list[dict]):
    arr = np.concatenate(frames).astype(np.float16)
    offsets = np.cumsum([0] + [f.shape[0] for f in frames]).tolist()
    tmp = out / f".shard{idx:05d}.{os.getpid()}.tmp.npy"
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / f"shard{idx:05d}.npy")
    tmp = out / f".shard{idx:05d}.{os.getpid()}.tmp.json"
    with open(tmp, "w") as fh:
        json.dump({"items": meta, "offsets": offsets}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / f"shard{idx:05d}.json")  # the JSON last: a shard counts once its JSON exists


def plan(sentences: list[str], seed: int, passes: int, n_valid: int | None = None) -> tuple[list[dict], list[dict]]:
    """(validation items in the evaluation voice, training items with a random voice and rate per pass);
    ``n_valid`` held-out sentences (default ``N_VALID``, read when called)."""
    n_valid = N_VALID if n_valid is None else n_valid
    rng = random.Random(seed)
    order = list(sentences)
    rng.shuffle(order)
    valid = [{"text": t, "voice": EVAL_SPEC.voice, "rate": EVAL_SPEC.rate} for t in order[:n_valid]]
    train = []
    for _ in range(passes):
        rest = order[n_valid:]
        rng.shuffle(rest)
        train += [{"text": t, "voice": rng.choice(VOICES), "rate": rng.choice(RATES)} for t in rest]
    return valid, train


def main(argv=None):
    from transformers import WhisperFeatureExtractor

    from .build import cache_root
    from .corpus import build_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=cache_root() / "ctc_features")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", type=int, default=3, help="voices per training sentence (one pass = every sentence once)")
    ap.add_argument("--max-items", type=int, default=None)
    ap.add_argument("--valid", type=int, default=None, help=f"held-out sentences to encode (default and at most {N_VALID})")
    ap.add_argument("--part", default="0/1", metavar="R/K",
                    help="encode only shards whose index is R modulo K (run K processes, R = 0..K-1, on K cores)")
    args = ap.parse_args(argv)
    part, parts = (int(x) for x in args.part.split("/"))
    if not 0 <= part < parts:
        raise SystemExit(f"--part {args.part}: R must be in 0..K-1")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    corpus_file = args.out / "corpus.json"
    if corpus_file.exists():
        corpus = json.loads(corpus_file.read_text())
    else:
        sentences, stats = build_corpus()
        corpus = {"sentences": sentences, "stats": stats}
        tmp = args.out / f".corpus.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(corpus))
        os.replace(tmp, corpus_file)
    valid, train = plan(corpus["sentences"], args.seed, args.passes, None if args.valid is None else min(args.valid, N_VALID))
    (args.out / "valid").mkdir(exist_ok=True)
    (args.out / "train").mkdir(exist_ok=True)
    fe = WhisperFeatureExtractor(feature_size=80)
    tower = load_encoder()
    jobs = [("valid", valid), ("train", train[: args.max_items])]
    t0, done = time.time(), 0
    for split, items in jobs:
        folder = args.out / split
        for idx, start in enumerate(range(0, len(items), SHARD)):
            if idx % parts != part or (folder / f"shard{idx:05d}.json").exists():  # resumable: finished shards are kept
                continue
            frames, meta = [], []
            for it in items[start : start + SHARD]:
                try:
                    audio = render(it["text"], TTSSpec(engine="espeak-ng", voice=it["voice"], rate=it["rate"]))
                except Exception as err:  # a voice missing on this machine
                    print(f"skip {it}: {err}", flush=True)
                    continue
                if len(audio) > 30 * 16000:
                    continue
                f = encode(tower, cropped_mel(audio, fe)).numpy()
                frames.append(f)
                meta.append({**it, "samples": len(audio)})
            if frames:
                _write_shard(folder, idx, frames, meta)
            done += len(meta)
            print(f"{split} shard {idx}: {done} utterances, {done / (time.time() - t0):.1f}/s", flush=True)


if __name__ == "__main__":
    main()
