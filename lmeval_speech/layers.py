"""Owns how a layer is addressed: a *hidden-state index*, 0 = the embeddings that enter the LLM
(for speech: the adapter/projector output), i = the output of decoder layer i (1-based), as in
``transformers``' ``output_hidden_states``; the last index (``n_layers``) is the output of the
decoder's *final norm*, as ``transformers`` reports it. Capture and interventions both use it, and
both act through one hook protocol (``lmeval_speech.hooks``) at the same sites: 0 = decoder layer
0's input, 1..n-1 = layer i's output, n = the final norm's output.

Changed by issue 17: an intervention at the last index used to edit the last layer's output
*before* the norm (a forward hook on the layer) while capture read it after the norm; now it edits
the final norm's output, the very state capture stores and the LM head reads, and the oracle's
text references are read there too. Why: one site per index, so a captured state and an edited
state of the same index are the same tensor; before, a ``length`` edit at ``last`` was rescaled
again by the (RMS)norm. Note that nothing reads a speech position's final state but capture (the
head scores the last context token, keys and values come from layer inputs), so an edit at the last
index changes no loglikelihood, before or after the change. A calibration file saved before issue
17 holds pre-norm statistics for its last index.

Syntax (it must survive lm-eval's ``--model_args``, which splits on commas): ``auto``, ``all``,
``last``, ``input`` (= 0), one index, a list joined by ``/`` (``0/4/8``) and ranges ``a-b``
(inclusive), e.g. ``capture_layers=0/10-12/last``. An index outside ``0..n_layers`` is an error.
"""

from __future__ import annotations


def parse_layers(spec, n_layers: int, default: str = "auto") -> list[int]:
    """Sorted hidden-state indices named by ``spec`` for a decoder of ``n_layers`` layers."""
    total = n_layers + 1
    spec = default if spec in (None, "") else str(spec).strip()
    if spec == "auto":  # 8 evenly spaced states, embeddings and last included
        return sorted({round(i * n_layers / 7) for i in range(8)})
    if spec == "all":
        return list(range(total))
    out: set[int] = set()
    for part in spec.replace(";", "/").split("/"):
        part = part.strip()
        if not part:
            continue
        if part == "input":
            out.add(0)
        elif part == "last":
            out.add(n_layers)
        elif "-" in part[1:]:
            lo, hi = (int(x) for x in part.split("-", 1))
            out.update(_check(i, total, spec) for i in range(lo, hi + 1))
        else:
            try:
                out.add(_check(int(part), total, spec))
            except ValueError as err:
                if "hidden states" in str(err):
                    raise
                raise ValueError(f"layers {spec!r}: {part!r} is not a layer index ({__doc__.split('Syntax')[1].strip()})") from None
    if not out:
        raise ValueError(f"layers {spec!r} names no layer")
    return sorted(out)


def _check(index: int, total: int, spec: str) -> int:
    if not 0 <= index < total:
        raise ValueError(f"layers {spec!r}: layer {index} is out of range; the model has {total} hidden states "
                         f"(0 = embeddings .. {total - 1} = last decoder layer, after the final norm)")
    return index
