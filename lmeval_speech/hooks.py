"""Owns the one way anything reads or edits the decoder's hidden states: forward hooks at the sites
of ``layers.py``'s hidden-state indices, installed for one decoder pass and removed after it (issue
17; pyvene's insight that collecting is an intervention too).

Sites, for a decoder of ``n`` layers (``site``):

* index 0: the input of decoder layer 0 (a forward *pre*-hook), i.e. the embeddings entering the
  decoder's layers (for speech: the adapter output scattered into the token embeddings, after any
  scaling the decoder applies, e.g. Granite's ``embedding_multiplier``);
* index i in 1..n-1: the output of decoder layer i (0-based layer ``i - 1``);
* index n: the output of the decoder's final norm (the backend's ``final_norm``), i.e. the state the
  LM head reads.

These are exactly the tensors ``transformers`` reports as ``output_hidden_states`` (it records
layer 0's input, each layer's output, and replaces the last with the post-norm
``last_hidden_state``), so a reader stores the same numbers bit for bit (``tests/test_hooks.py``).

Users of the protocol are ``Tap``s: a *reader* (``READ``: capture, the oracle's text references)
gets ``fn(index, hidden)`` with ``hidden`` [B, T, D] and returns nothing; an *editor* (``EDIT``:
interventions) returns the edited tensor (a new one, never edited in place), which is what the
model carries on with. At one site editors run first (in the order given), then readers, so a reader
sees what the next module receives. Our hooks are prepended to any other hooks of the module, so
other observers (``output_hidden_states``, a test's own hooks) see the edited state too.

Positions are the caller's business: they come with each sequence (the runner's speech positions or
question span), never from a cache's state. ``HookSpec`` is what the run manifest records.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

READ, EDIT = "read", "edit"


def site(index: int, n_layers: int) -> str:
    """Where hidden-state ``index`` is read or edited, in words (for the manifest)."""
    if not 0 <= index <= n_layers:
        raise ValueError(f"hidden-state index {index} is out of range 0..{n_layers}")
    if index == 0:
        return "input of decoder layer 0"
    if index == n_layers:
        return "output of the decoder's final norm"
    return f"output of decoder layer {index - 1} (0-based)"


@dataclass(frozen=True)
class HookSpec:
    """One user of the protocol, as the run manifest records it: what it does (``read``/``edit``),
    at which hidden-state indices, and which positions of each row (a rule, in words)."""

    kind: str
    layers: tuple[int, ...]
    positions: str

    def to_dict(self, n_layers: int) -> dict:
        return {"kind": self.kind, "layers": list(self.layers), "positions": self.positions,
                "sites": {str(i): site(i, n_layers) for i in self.layers}}


@dataclass
class Tap:
    """``fn(index, hidden [B, T, D])`` at each of ``layers``: a reader returns None, an editor the
    edited tensor (or None to leave it as is)."""

    kind: str
    layers: Sequence[int]
    fn: Callable[[int, torch.Tensor], torch.Tensor | None]

    def __post_init__(self):
        if self.kind not in (READ, EDIT):
            raise ValueError(f"a tap reads or edits, got {self.kind!r}")


def _apply(index: int, taps: list[Tap], hidden: torch.Tensor) -> torch.Tensor:
    for tap in taps:  # editors first (see hooked)
        out = tap.fn(index, hidden)
        if tap.kind == EDIT and out is not None:
            hidden = out
    return hidden


@contextlib.contextmanager
def hooked(layers: Sequence[torch.nn.Module], final_norm: torch.nn.Module | None, taps: Sequence[Tap],
           stream: int | None = None):
    """Install ``taps`` on the decoder (``layers`` and its ``final_norm``) for the duration of the
    ``with`` block; every hook is removed on exit, also on error. With ``final_norm`` None the last
    index is the last layer's output (``Backend.final_norm`` is None for such a family).

    ``stream``: for decoders whose layers carry several stacked streams ``[S, B, T, D]`` (Gemma 3n's
    AltUp), the stream that is the hidden state; taps see ``[B, T, D]`` and an edit is written back
    into that stream only, the others pass through."""
    n = len(layers)
    by_index: dict[int, list[Tap]] = {}
    for tap in sorted(taps, key=lambda t: t.kind != EDIT):  # stable: editors, then readers
        for i in dict.fromkeys(tap.layers):
            site(i, n)  # range check
            by_index.setdefault(int(i), []).append(tap)
    handles = []
    try:
        for i, group in sorted(by_index.items()):
            if i == 0:
                handles.append(layers[0].register_forward_pre_hook(_pre_hook(group, stream), with_kwargs=True,
                                                                    prepend=True))
            else:
                # index n: the final norm's output, or (final_norm None: a family whose transformers
                # hidden states end with the last layer's output, Gemma 3n) the last layer's output
                module = layers[i - 1] if i < n or final_norm is None else final_norm
                handles.append(module.register_forward_hook(_post_hook(i, group, stream), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _apply_stream(index: int, group: list[Tap], hidden: torch.Tensor, stream: int | None) -> torch.Tensor:
    """``_apply`` on the hidden state, which is one stream of a stacked ``[S, B, T, D]`` tensor when
    ``stream`` is set; the result is ``hidden`` itself when nothing was edited."""
    if stream is None or hidden.dim() != 4:
        return _apply(index, group, hidden)
    view = hidden[stream]
    new = _apply(index, group, view)
    if new is view:
        return hidden
    out = hidden.clone()
    out[stream] = new
    return out


def _pre_hook(group: list[Tap], stream: int | None = None):
    def fn(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        new = _apply_stream(0, group, hidden, stream)
        if new is hidden:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}
    return fn


def _post_hook(index: int, group: list[Tap], stream: int | None = None):
    def fn(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        new = _apply_stream(index, group, hidden, stream)
        if new is hidden:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return fn


class PositionReader:
    """A reader: at each of ``layers``, the states at each request's positions, ``requests`` being
    ``[(batch row, positions), ...]``; ``states(k)`` gives request ``k``'s [P, D] per index, in
    ``layers`` order (copies: ``index_select``)."""

    def __init__(self, layers: Sequence[int], requests: list[tuple[int, list[int]]]):
        self.layers = list(layers)
        self.requests = requests
        self._states: list[dict[int, torch.Tensor]] = [{} for _ in requests]

    @property
    def tap(self) -> Tap:
        return Tap(READ, self.layers, self._read)

    def _read(self, index: int, hidden: torch.Tensor) -> None:
        for k, (row, positions) in enumerate(self.requests):
            idx = torch.tensor(positions, dtype=torch.long, device=hidden.device)
            self._states[k][index] = hidden[row].index_select(0, idx)

    def states(self, k: int) -> list[torch.Tensor]:
        got = self._states[k]
        missing = [i for i in self.layers if i not in got]
        if missing:
            raise RuntimeError(f"hidden-state indices {missing} were not reached in the decoder pass")
        return [got[i] for i in self.layers]
