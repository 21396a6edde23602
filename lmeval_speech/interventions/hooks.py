"""Edit speech hidden states at chosen layers and positions during the ``lslm`` forward pass.

Addressing follows nnsight/pyvene's "layer L, positions P", with layers as *hidden-state indices*
(``lmeval_speech.layers``, the same convention as capture): 0 (or ``input``) is the speech token
embeddings that enter the LLM (the adapter/projector output), L >= 1 the output of decoder layer L.
Positions are the *critical* speech tokens: the speech positions on the alignment path with the
lowest alignment scores (``bottomK``), or all of them.

Two modes, labelled in results:

* **oracle** (the seed paper's analysis): the paired text twin of the same item runs first; its
  question-token states at the same layer give the alignment path and the target direction/norm.
* **calibrated** (deployable, no text at test time): per-layer target norm and direction are the mean
  text-token norm and mean unit direction over a calibration set, saved by an oracle run with
  ``save_calibration=PATH``; critical tokens are the speech tokens least similar to that direction.

Edits are an editor on the one hook protocol (``lmeval_speech.hooks``) and the oracle's text
references a reader on it, at the same sites as capture: index 0 is decoder layer 0's input, i the
output of layer i, and the last index the output of the decoder's *final norm* (until issue 17 an
edit there hit the last layer's output before the norm while capture and the references read after
it). Edits are position-masked per batch row, and the hooks are removed when the pass is done, so a
later plain forward is bit-identical to one that never saw an intervention.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmeval_speech.metrics import argmax_path, critical_tokens, similarity_matrix
from lmeval_speech import twins
from lmeval_speech.fileio import atomic_write

from .ops import OPS, RANDOM_OPS, STEER_OPS

INPUT = "input"


def _parse_critical(spec) -> int | None:
    spec = str(spec).lower()
    if spec == "all":
        return None
    if spec.startswith("bottom") and spec[6:].isdigit():
        return int(spec[6:])
    raise ValueError(f"critical must be all or bottomK (e.g. bottom3), got {spec!r}")


@dataclass
class InterventionSpec:
    kind: str
    layers: str = INPUT  # as given; resolved to hidden-state indices against the model
    critical: int | None = 3
    strength: float = 1.0
    mode: str = "oracle"
    calibration: str | None = None
    save_calibration: str | None = None

    @classmethod
    def from_args(cls, intervention, intervene_layers=INPUT, critical="bottom3", strength=1.0,
                  intervention_mode="oracle", calibration=None, save_calibration=None):
        if intervention not in OPS:
            raise ValueError(f"intervention must be none or one of {sorted(OPS)}, got {intervention!r}")
        strength = float(strength)
        if intervention in STEER_OPS:
            if not calibration:
                raise ValueError(f"intervention={intervention} needs calibration=FILE, a steering vector made by "
                                 "`lmeval-speech steer CAPTURE_DIR --out FILE` from a capture of other items")
            if not strength >= 0.0:
                raise ValueError(f"strength scales the steering vector: it must be >= 0, got {strength}")
            intervention_mode = "steer"
        elif intervention_mode not in {"oracle", "calibrated"}:
            raise ValueError("intervention_mode must be oracle or calibrated")
        elif not 0.0 <= strength <= 1.0:
            raise ValueError("strength must be in [0, 1]")
        if intervention_mode == "calibrated" and not calibration:
            raise ValueError("intervention_mode=calibrated needs calibration=PATH (from an oracle run's save_calibration)")
        return cls(intervention, str(intervene_layers or INPUT), _parse_critical(critical), strength,
                   intervention_mode, calibration, save_calibration)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["critical"] = "all" if self.critical is None else f"bottom{self.critical}"
        return d


class Intervener:
    """Holds the text-side references and applies the edits for one ``lslm`` instance."""

    def __init__(self, spec: InterventionSpec, n_layers: int):
        from lmeval_speech.layers import parse_layers

        self.spec = spec
        self.n_layers = int(n_layers)
        # hidden-state indices (sites: lmeval_speech.hooks); index 0 is keyed INPUT in references and calibration files
        self.indices = parse_layers(spec.layers, self.n_layers, default=INPUT)
        self.layers = [INPUT if h == 0 else h for h in self.indices]
        self.text_states: dict[tuple, dict] = {}  # (pair, doc_id) -> {layer: [Tt, D] tensor}
        self._pending: dict[tuple, int] = {}  # (pair, doc_id) -> speech sequences not yet scored
        self._sums: dict = {}
        self.calib = self._load_calibration(spec.calibration) if spec.mode == "calibrated" else None
        self.steer, self.steer_items = None, set()
        if spec.mode == "steer":
            from .steer import load

            vectors, self.steer_items = load(spec.calibration)
            missing = [h for h in self.indices if h not in vectors]
            if missing:
                raise ValueError(f"{spec.calibration} has no steering vector at hidden states {missing}")
            self.steer = {self._key(h): torch.from_numpy(vectors[h]) for h in self.indices}
        self.edits = 0

    # ---------------------------------------------------------------- calibration file
    @staticmethod
    def _load_calibration(path) -> dict:
        from safetensors.numpy import load_file

        data = load_file(str(path))
        names = {k.rsplit(".", 1)[0] for k in data}
        return {
            (INPUT if name in (INPUT, "0") else int(name)): {"norm": float(data[f"{name}.norm"][0]),
                                                     "direction": torch.from_numpy(data[f"{name}.direction"])}
            for name in names
        }

    def save_calibration(self, lm=None) -> None:
        """Write the calibration file once, from every rank's items (gathered to rank 0)."""
        path = self.spec.save_calibration
        if not path:
            return
        sums = self._sums
        if lm is not None and lm.world_size > 1:
            gathered = lm.gather_object(sums)
            if lm.rank != 0:
                return
            sums = {}
            for part in gathered:
                for layer, (norm_sum, dir_sum, n) in part.items():
                    s = sums.setdefault(layer, [0.0, np.zeros_like(dir_sum), 0])
                    s[0] += norm_sum
                    s[1] = s[1] + dir_sum
                    s[2] += n
        if not sums:
            return
        arrays = {}
        for layer, (norm_sum, dir_sum, n) in sums.items():
            arrays[f"{layer}.norm"] = np.array([norm_sum / n], dtype=np.float32)
            d = dir_sum / n
            arrays[f"{layer}.direction"] = (d / np.linalg.norm(d)).astype(np.float32)
        from safetensors.numpy import save

        atomic_write(path, save(arrays, metadata={"spec": json.dumps(self.spec.to_dict()), "items": str(n)}))

    # ---------------------------------------------------------------- hooks
    def hook_spec(self, kind: str):
        """This intervention's use of the hook protocol, for the manifest: ``edit`` on speech rows,
        ``read`` on the oracle's text twins."""
        from lmeval_speech.hooks import HookSpec

        positions = ("critical speech positions (" + ("all" if self.spec.critical is None else f"bottom{self.spec.critical}")
                     + ") among the sequence's speech positions") if kind == "edit" else "the text twin's question span"
        return HookSpec(kind, tuple(self.indices), positions)

    @staticmethod
    def _key(index: int):
        return INPUT if index == 0 else index

    def expect(self, keys) -> None:
        """Speech sequences about to be scored, by item: their references are kept until the last one."""
        keys = list(keys)
        if overlap := {tuple(k) for k in keys} & self.steer_items:
            raise ValueError(f"the steering vector {self.spec.calibration} was estimated on {len(overlap)} of the items "
                             f"this run evaluates (e.g. {sorted(overlap)[:3]}): estimate it on other items (another "
                             "split or other doc ids), or the edit hands each item its own text states")
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1

    def scored(self, keys) -> None:
        """Drop an item's oracle references once all its speech sequences are scored (bounded memory)."""
        for key in keys:
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
                self.text_states.pop(key, None)

    def recording_text(self, rows: list):
        """A reader (``lmeval_speech.hooks.Tap``) storing each text-twin row's question-span states
        at every intervened index; ``rows[r]`` is ``(twin key, positions)`` or None."""
        from lmeval_speech.hooks import READ, Tap

        def keep(index, states):
            for r, info in enumerate(rows):
                if info is not None:
                    key, positions = info
                    t = states[r, positions].detach().float().cpu()
                    self.text_states.setdefault(key, {})[self._key(index)] = t
                    self._accumulate(self._key(index), t)

        return Tap(READ, self.indices, keep)

    def _accumulate(self, layer, t: torch.Tensor) -> None:
        if not self.spec.save_calibration:
            return
        norms = t.norm(dim=-1)
        units = (t / norms[:, None].clamp_min(1e-12)).numpy()
        s = self._sums.setdefault(layer, [0.0, np.zeros(t.shape[1]), 0])
        s[0] += float(norms.sum())
        s[1] += units.sum(0)
        s[2] += t.shape[0]

    def editing_speech(self, rows: list):
        """An editor (``lmeval_speech.hooks.Tap``) on the critical speech positions of each speech
        row; ``rows[r]`` is ``(twin key, speech positions)`` or None."""
        from lmeval_speech.hooks import EDIT, Tap

        def edit(index, hidden):
            hidden = hidden.clone()
            self._edit(self._key(index), hidden, rows)
            return hidden

        return Tap(EDIT, self.indices, edit)

    def targets(self, layer, key, speech: torch.Tensor):
        """(speech row indices to edit, target states or norms) for one item at one layer."""
        k = self.spec.critical
        if self.steer is not None:
            vector = self.steer[layer].to(speech.dtype)
            if k is None:
                idx = torch.arange(speech.shape[0])
            else:  # the speech positions least aligned with the text-ward direction
                sim = torch.nn.functional.cosine_similarity(speech.float(), vector.float()[None], dim=-1)
                idx = torch.argsort(sim)[:k]
            return idx, vector[None].expand(len(idx), -1)
        if self.calib is not None:
            ref = self.calib[layer]
            direction = ref["direction"].to(speech.dtype)
            sim = torch.nn.functional.cosine_similarity(speech.float(), direction.float()[None], dim=-1)
            order = torch.argsort(sim)
            idx = order if k is None else order[:k]
            tgt = direction[None].expand(len(idx), -1) * ref["norm"]
            return idx, tgt
        text = self.text_states.get(key, {}).get(layer)
        if text is None and not twins.has_spoken_text(key[0]):
            raise KeyError(f"oracle intervention on {key[0]} doc {key[1]}: {twins.no_spoken_text(key[0])}, so its "
                           "text twin's states are not known; or intervention_mode=calibrated")
        if text is None:
            raise KeyError(f"oracle intervention needs the text twin of {key[0]} doc {key[1]} in the same run "
                           f"(add {key[0]}_text to --tasks) or intervention_mode=calibrated")
        A = similarity_matrix(speech.detach().float().cpu().numpy(), text.numpy(), measure="cosine")
        path = argmax_path(A)
        idx = np.asarray(critical_tokens(A, path, k=k), dtype=np.int64)
        # each critical speech position takes the text token it aligns to best
        best_j = np.array([np.flatnonzero(path == i)[np.argmax(A[i, path == i])] for i in idx], dtype=np.int64)
        return torch.from_numpy(idx), text[torch.from_numpy(best_j)].to(speech.dtype)

    @staticmethod
    def _generator(key, layer) -> torch.Generator:
        """The random controls' draws: one seed per (item, layer), the same in every batch and rerun."""
        import zlib

        return torch.Generator().manual_seed(zlib.crc32(repr((tuple(key), str(layer))).encode()))

    def _edit(self, layer, hidden: torch.Tensor, rows: list) -> None:
        op = OPS[self.spec.kind]
        for r, info in enumerate(rows):
            if info is None:
                continue
            key, positions = info
            pos = torch.as_tensor(positions, device=hidden.device)
            speech = hidden[r, pos]
            idx, tgt = self.targets(layer, key, speech)
            if len(idx) == 0:
                continue
            idx = idx.to(hidden.device)
            extra = {"generator": self._generator(key, layer)} if self.spec.kind in RANDOM_OPS else {}
            hidden[r, pos[idx]] = op(speech[idx], tgt.to(hidden.device, hidden.dtype), self.spec.strength,
                                     **extra).to(hidden.dtype)
            self.edits += len(idx)
