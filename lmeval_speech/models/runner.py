"""Owns running batches through a backend: lm-eval's ``Collator`` orders and cuts them (longest
first; sequences with the same model input share one forward pass), speech embeddings are scattered
into the token embeddings (``SpeechEmbeddings``: each audio encoded once for all its choices), the
decoder runs under the capture and intervention hooks, and each continuation is read from the LM
head; left-padded batches for generation. ``LSLM`` (``models/lslm.py``) is the lm-eval API on top.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch
import torch.nn.functional as F
from lm_eval.models.utils import Collator
from tqdm import tqdm

from lmeval_speech import twins
from lmeval_speech.models.plan import AudioRequestError, Seq


class SpeechEmbeddings:
    """Speech token embeddings by audio key: an LRU, so each item's audio is encoded once for all
    its choices (and, for a backend whose token count depends on the content, once for counting), of at
    most ``size`` clips and ``BUDGET`` bytes. ``encoded`` counts the encoder's clips (a clip encoded twice
    was evicted between its count and its batch)."""

    #: bytes of embeddings kept (the embedded model's: ~100 KB a clip; a 7B model's: a few MB)
    BUDGET = 1 << 30

    def __init__(self, backend, size: int):
        self.backend, self.size = backend, int(size)
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes, self.encoded = 0, 0

    def count(self, key: str, array) -> int:
        if key not in self._lru:
            self.encoded += 1
            self._put(key, self.backend.encode([array])[0])
        return int(self._lru[key].shape[0])

    def get(self, keys: list[str], load) -> dict[str, torch.Tensor]:
        """Embeddings of every key of one batch. The batch's cached keys are taken (and made most
        recent) before its missing ones are encoded and inserted, and the result is built from what
        was taken and encoded: inserting may evict older entries, never one this batch needs."""
        out: dict[str, torch.Tensor] = {}
        for k in dict.fromkeys(keys):
            if k in self._lru:
                self._lru.move_to_end(k)
                out[k] = self._lru[k]
        missing = [k for k in dict.fromkeys(keys) if k not in out]
        if missing:
            self.encoded += len(missing)
            for k, emb in zip(missing, self.backend.encode([load(k) for k in missing]), strict=True):
                out[k] = emb
                self._put(k, emb)
        return out

    def _put(self, key, emb) -> None:
        self._lru[key] = emb
        self._bytes += emb.nbytes
        while len(self._lru) > 1 and (len(self._lru) > max(self.size, 1) or self._bytes > self.BUDGET):
            self._bytes -= self._lru.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self._lru.clear()
        self._bytes = 0



class BatchRunner:
    """The scoring loop of ``LSLM`` (a mixin: it reads the model's backend, resolved audio, embeddings,
    capture and intervener from ``self``)."""

    # ------------------------------------------------------------------ forward
    def _embed(self, seqs: list[Seq], items):
        """Right-padded ``inputs_embeds`` with speech embeddings in place, plus masks."""
        b = self.backend_impl
        width = max(len(s.tokens) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s.tokens)] = torch.tensor(s.tokens)
            mask[i, : len(s.tokens)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = b.embed_tokens(ids)
        keys = [k for s in seqs for _, k, _ in s.audio]
        if keys:
            speech = self.embeddings.get(keys, lambda k: self.audio.clip(k, items[k]))
            embeds = embeds.clone()
            for i, s in enumerate(seqs):
                for start, k, n in s.audio:
                    e = speech[k]
                    if e.shape[0] != n:
                        raise AudioRequestError(f"audio encoded to {e.shape[0]} positions, planned {n}")
                    embeds[i, start : start + n] = e.to(embeds.dtype)
        return ids, mask, embeds

    def _intervention_taps(self, batch: list[Seq]) -> list:
        """Text twins record their reference states (a reader); speech rows get edited (an editor);
        see interventions.hooks. Positions come with each sequence."""
        iv = self.intervener
        if iv is None:
            return []
        if any(s.audio for s in batch):
            return [iv.editing_speech([(s.twin_key, s.speech_positions) if self._edited(s) else None for s in batch])]
        rows = [(s.twin_key, list(range(*s.span))) if s.span is not None and s.request.idx == 0
                and iv.spec.mode == "oracle" else None for s in batch]
        return [iv.recording_text(rows)]

    def _intervention_role(self, s: Seq):
        """What an intervention does to this sequence's pass, as part of the key of the sequences that
        share one forward pass: the hooks are set from a group's first sequence, so sequences with the
        same input but different roles must not share it. A shuffled control of item i hears item j's
        audio under item j's speech prompt: one group would edit the control with j's oracle, or leave
        j's speech twin unedited (whichever came first)."""
        if self.intervener is None:
            return None
        if s.audio:
            return ("edit", s.twin_key) if self._edited(s) else ("plain",)
        return ("text", s.twin_key)

    def _edited(self, s: Seq) -> bool:
        """Whether an intervention edits this sequence: every audio row, except, for an oracle, the
        prior controls (another item's audio, silence): the oracle would write this item's own text
        states into them, handing the control the question it is meant not to hear."""
        if not s.audio:
            return False
        if self.intervener.spec.mode != "oracle" or s.request is None:
            return True
        return twins.twin_of(s.request.task_name, True).modality not in twins.CONTROLS

    def _captures(self, s: Seq) -> bool:
        if self.capture is None or not self.capture.wants(s.request, s.input_sha256):
            return False
        return bool(s.audio) or s.span is not None

    @staticmethod
    def _capture_positions(s: Seq) -> list[int]:
        """Captured positions of a sequence: its speech positions, or its question span for text."""
        return s.speech_positions if s.audio else list(range(*s.span))

    def _capture_row(self, s: Seq, states: list) -> None:
        """``states``: one [P, D] tensor per hidden-state index, at ``_capture_positions(s)``. With token
        states, the logit lens (``models/lens.py``) ranks the text twin's question tokens at every captured
        position: a text row's own span tokens, a speech row's twin's (when the twin is in this run)."""
        from functools import partial

        from lmeval_speech.models.lens import lens_ranks

        audio_notes = [self.audio.status[k].notes for _, k, _ in s.audio] if s.audio else []
        ids = self._lens_ids.get(s.twin_key) if s.audio else s.tokens[s.span[0]:s.span[1]]
        lens = partial(lens_ranks, self.backend_impl, len(self.backend_impl.decoder_layers))
        self.capture.add(s.request, bool(s.audio), states, audio_notes, s.input_sha256, lens=lens, lens_ids=ids)

    _lens_ids: dict = {}

    def _collect_lens_ids(self, seqs: list[Seq]) -> None:
        """Each text twin's question tokens by item (pair, doc id), for the logit lens on its speech twin."""
        if self.capture is not None and self.capture.mode == "tokens":
            self._lens_ids = {s.twin_key: list(s.tokens[s.span[0]:s.span[1]]) for s in seqs
                              if not s.audio and s.span is not None and s.twin_key is not None}

    @staticmethod
    def _context(s: Seq) -> list[int]:
        """The tokens up to the last context token: the last of them predicts the first continuation token."""
        return s.tokens[: len(s.tokens) - len(s.cont) + 1] if s.cont else s.tokens

    @torch.no_grad()
    def _score(self, seqs: list[Seq], items, desc: str, disable_tqdm=False, on_batch=None):
        """Log-likelihood and greedy flag of each sequence's continuation, in ``seqs`` order.

        With ``prefix_cache`` (the default), sequences with the same context and audio (the choices
        of one item) form one group: the context runs through the decoder once, with hooks (capture,
        interventions) on that pass, and the continuations extend its key/value cache. Without it,
        only sequences with the same model input (e.g. the one-token choices " A".." D") share a
        forward pass and each other sequence runs whole.

        ``on_batch([(seq, result), ...])`` runs after every batch, so results can be persisted as
        they come (lm-eval's ``--use_cache``) and an interrupted run loses at most one batch.
        """
        results: dict[int, tuple[float, bool]] = {}
        prefix = self.prefix_cache and self.backend_impl.supports_prefix_cache
        shared: dict[tuple, list[Seq]] = {}
        for s in seqs:
            key = tuple(self._context(s)) if prefix else tuple(s.tokens)
            shared.setdefault((key, tuple(s.audio), self._intervention_role(s)), []).append(s)
        # lm-eval's Collator orders the groups longest first (so a batch's padding is small and an
        # out-of-memory error comes first) and cuts them into batches
        collator = Collator(list(shared.values()), sort_fn=lambda g: -len(g[0].tokens) - max(len(s.cont) for s in g))
        pbar = tqdm(total=len(seqs), desc=desc, disable=disable_tqdm or self.rank != 0)
        for batch_groups in collator.get_batched(n=max(1, self.batch_size)):
            if prefix:
                scored = self._score_prefix_batch(batch_groups, items)
            else:
                scored = self._score_whole_batch(batch_groups, items)
            done = []
            for s, res in scored:
                results[id(s)] = res
                done.append((s, res))
            if self.intervener is not None:
                self.intervener.scored([s.twin_key for g in batch_groups for s in g if s.audio])
            pbar.update(len(done))
            if on_batch is not None:
                on_batch(done)
            for hook in self.after_batch_hooks:
                hook(self, done)
        pbar.close()
        return [results[id(s)] for s in seqs]

    def _hooked_forward(self, batch: list[Seq], batch_groups, items, use_cache=False):
        """One decoder pass over ``batch`` (one row per group) under the hook protocol
        (``lmeval_speech.hooks``): the intervention's editor or reader and the capture reader, removed
        after the pass; every sequence of a group that wants capture is recorded from it."""
        from lmeval_speech.hooks import PositionReader, hooked

        b = self.backend_impl
        ids, mask, embeds = self._embed(batch, items)
        rows = [(r, s) for r, g in enumerate(batch_groups) for s in g if self._captures(s)]
        self._set_modality(batch)
        taps = self._intervention_taps(batch)
        reader = None
        if rows:
            reader = PositionReader(self.capture.layers, [(r, self._capture_positions(s)) for r, s in rows])
            taps.append(reader.tap)
        layers = b.decoder_layers
        final_norm = b.final_norm if any(len(layers) in t.layers for t in taps) else None
        with hooked(layers, final_norm, taps, stream=b.layer_output_stream):
            out = b.run_decoder(embeds, mask, ids, use_cache=use_cache)
        for k, (_, s) in enumerate(rows):
            self._capture_row(s, reader.states(k))
        return out, mask

    @staticmethod
    def _read(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        logp = F.log_softmax(logits.float(), dim=-1)
        cont = torch.tensor(cont, device=logp.device, dtype=torch.long)
        return float(logp.gather(1, cont[:, None]).sum()), bool((logp.argmax(-1) == cont).all())

    def _score_whole_batch(self, batch_groups, items):
        out, _ = self._hooked_forward([g[0] for g in batch_groups], batch_groups, items)
        scored = []
        for row, group in enumerate(batch_groups):
            for s in group:
                n, c = len(s.tokens), len(s.cont)
                scored.append((s, self._read(self.backend_impl.logits(out.last_hidden[row, n - c : n]), s.cont)))
        return scored

    def _score_prefix_batch(self, batch_groups, items):
        b = self.backend_impl
        prefixes = [replace(g[0], tokens=self._context(g[0]), cont=[]) for g in batch_groups]
        tails = [(r, s) for r, g in enumerate(batch_groups) for s in g if len(s.cont) > 1]
        if self.sort_tails:  # chunks of similar lengths pad less (MMLU's choices: 1.93x -> 1.37x the real tokens)
            tails.sort(key=lambda t: len(t[1].cont))
        out, mask = self._hooked_forward(prefixes, batch_groups, items, use_cache=bool(tails))
        lens = torch.tensor([len(p.tokens) for p in prefixes], device=out.last_hidden.device)
        first = b.logits(out.last_hidden[torch.arange(len(prefixes), device=lens.device), lens - 1])
        hidden: dict[int, torch.Tensor] = {}
        if tails and self.pack_tails and b.packs:
            hidden = self._packed_tails(b, out, mask, tails, len(prefixes))
            tails = []
        # the continuations, in chunks of at most batch_size rows (each holds a copy of its prefix's cache)
        step = max(1, self.batch_size)
        for lo in range(0, len(tails), step):
            chunk = tails[lo : lo + step]
            width = max(len(s.cont) - 1 for _, s in chunk)
            ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)
            tail_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (_, s) in enumerate(chunk):
                ids[i, : len(s.cont) - 1] = torch.tensor(s.tokens[len(s.tokens) - len(s.cont) + 1 :])
                tail_mask[i, : len(s.cont) - 1] = 1
            rows = torch.tensor([r for r, _ in chunk], device=mask.device)
            h = b.run_continuation(out, mask, rows, ids.to(mask.device), tail_mask.to(mask.device))
            for i, (_, s) in enumerate(chunk):
                hidden[id(s)] = h[i, : len(s.cont) - 1]
        # the LM head once over every continuation position of the batch: one call per continuation re-read
        # the whole [vocabulary x hidden] head for a few rows each (10% of the matmul peak, benchmarks/roofline.py)
        tail_logits: dict[int, torch.Tensor] = {}
        if hidden:
            order = list(hidden)
            for key, part in zip(order, b.logits(torch.cat([hidden[k] for k in order])).split(
                    [hidden[k].shape[0] for k in order]), strict=True):
                tail_logits[key] = part
        scored = []
        for r, g in enumerate(batch_groups):
            for s in g:
                if not s.cont:
                    scored.append((s, (0.0, True)))
                    continue
                logits = first[r : r + 1]
                if len(s.cont) > 1:
                    logits = torch.cat([logits, tail_logits[id(s)]])
                scored.append((s, self._read(logits, s.cont)))
        return scored

    def _packed_tails(self, b, out, mask, tails, n_rows) -> dict[int, torch.Tensor]:
        """Every continuation of the batch in one decoder pass, packed (``run_packed``): each prefix's
        continuations back to back in rows of one width (the longest continuation, or the batch's tokens
        over its prefixes if more), so a prefix with many long choices takes two rows rather than widening
        every row; a prefix row is copied only where it needs two rows, or where some prefix needs none."""
        by_row: dict[int, list] = {}
        for r, s in tails:
            by_row.setdefault(r, []).append(s)
        length = {id(s): len(s.cont) - 1 for _, s in tails}
        width = max(max(length.values()), -(-sum(length.values()) // n_rows))
        packed: list[tuple[int, list]] = []  # (prefix row, its continuations in this packed row)
        for r in sorted(by_row):
            row, used = [], 0
            for s in sorted(by_row[r], key=lambda s: -length[id(s)]):
                if row and used + length[id(s)] > width:
                    packed.append((r, row))
                    row, used = [], 0
                row.append(s)
                used += length[id(s)]
            packed.append((r, row))
        width = max(sum(length[id(s)] for s in row) for _, row in packed)
        ids = torch.full((len(packed), width), self._pad_id, dtype=torch.long)
        seg = torch.full((len(packed), width), -1, dtype=torch.long)
        off = torch.zeros((len(packed), width), dtype=torch.long)
        where = []
        for i, (_, row) in enumerate(packed):
            lo = 0
            for k, s in enumerate(row):
                n = length[id(s)]
                ids[i, lo : lo + n] = torch.tensor(s.tokens[len(s.tokens) - n :])
                seg[i, lo : lo + n], off[i, lo : lo + n] = k, torch.arange(n)
                where.append((s, i, lo, n))
                lo += n
        sources = [r for r, _ in packed]
        rows = None if sources == list(range(n_rows)) else torch.tensor(sources, device=mask.device)
        h = b.run_packed(out, mask, ids.to(mask.device), seg, off, rows)
        return {id(s): h[i, lo : lo + n] for s, i, lo, n in where}

    def _set_modality(self, batch: list[Seq]) -> None:
        b = self.backend_impl
        if b.modality_dependent:
            kinds = {bool(s.audio) for s in batch}
            if len(kinds) != 1:
                raise RuntimeError("a batch mixes audio and text rows for a modality-dependent backend")
            b.set_modality(kinds.pop())

    #: Score all choices of an item from one pass over their shared context (``prefix_cache`` model arg).
    prefix_cache: bool = True

    #: Chunk a batch's continuations by length (shortest first) rather than by item; the numbers are the
    #: same up to float rounding (other padding: 3e-5 on MMLU), the padding less. ``benchmarks/bench_continuations.py`` times both.
    sort_tails: bool = True

    #: Run a batch's continuations packed, one row per prefix (where the backend allows): the same numbers up to
    #: float rounding, without a copy of the prefix's cache per continuation. ``benchmarks/roofline.py`` times both.
    pack_tails: bool = True

    #: Callables ``hook(lm, [(seq, result), ...])`` run after every scored batch (tests use one to
    #: interrupt a run at a chosen batch; nothing in the package installs one).
    after_batch_hooks: list = []

    #: Items per oracle chunk: their text twins' states are held until their speech twins are scored.
    ORACLE_CHUNK = 256

    def _oracle_phases(self, seqs: list[Seq]) -> list[list[Seq]]:
        """With an intervention, each chunk of items runs its text twins first (the oracle's
        references), then its speech twins, whose scoring frees the references: memory is bounded
        by the chunk, not the run."""
        chunks: dict[int, tuple[list, list]] = {}
        index: dict = {}
        for s in seqs:
            c = index.setdefault(s.twin_key, len(index)) // self.ORACLE_CHUNK
            chunks.setdefault(c, ([], []))[bool(s.audio)].append(s)
        self.intervener.expect([s.twin_key for s in seqs if s.audio])
        return [phase for c in sorted(chunks) for phase in chunks[c] if phase]

    def _left_padded(self, seqs: list[Seq], items):
        """Left-padded ``inputs_embeds`` and mask for generation (as lm-eval's ``hf`` pads for it)."""
        width = max(len(s.tokens) for s in seqs)
        shifted = [Seq(s.index, [self._pad_id] * (width - len(s.tokens)) + s.tokens, [],
                       [(start + width - len(s.tokens), k, n) for start, k, n in s.audio]) for s in seqs]
        ids, _, embeds = self._embed(shifted, items)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            mask[i, width - len(s.tokens):] = 1
        return embeds, mask, ids

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eot_token_id

