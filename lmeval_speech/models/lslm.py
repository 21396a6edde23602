"""``lslm``: lm-eval's model class for speech LLMs (and their text twins).

One code path for every request. A request is ``(context, continuation[, {"audio": [...]}])``.
Each audio is resolved (a lazy TTS reference is synthesized through the on-disk cache; a dataset
array is normalized), its ``<audio>`` marker in the prompt becomes the backend's placeholder, the
placeholder token is expanded to as many positions as the encoder yields, and the sequence is
scored by log-likelihood: token embeddings with the speech token embeddings scattered in, the
LLM decoder, and the LM head on the continuation positions only.

Each distinct audio is encoded once per call (an LRU of speech embeddings), so the four choices
of a multiple-choice item cost one encoder pass. Text-only requests follow lm-eval's ``hf`` model
token for token (``_encode_pair``, left truncation, right padding), which the parity test checks.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from lmeval_speech import AUDIO_MARKER

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _maybe_inject_fault() -> None:
    """Fault injection for the interruption test: SIGKILL this process after N batches."""
    import os

    left = os.environ.get("LMEVAL_SPEECH_KILL_AFTER_BATCHES")
    if left is None:
        return
    if int(left) <= 1:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    os.environ["LMEVAL_SPEECH_KILL_AFTER_BATCHES"] = str(int(left) - 1)


class AudioRequestError(ValueError):
    """A request's audio cannot be used (missing, unreadable, too long, marker mismatch)."""


@dataclass
class _Seq:
    """One scored sequence: token ids with audio placeholders expanded."""

    index: int  # position in the caller's request list (or window index for rolling)
    tokens: list[int]  # model input (everything but the last token)
    cont: list[int]  # continuation tokens scored at the end of ``tokens`` (+ 1 shifted)
    audio: list[tuple[int, str]] = field(default_factory=list)  # (start position, audio key)
    request: object = None  # the lm-eval Instance, for capture
    capture: tuple[int, int] | None = None  # text-span positions to capture (text twin), if any
    span: tuple[int, int] | None = None  # text twin's spoken-content positions (for interventions)


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in {"1", "true", "yes", "on"}


def audio_key(item: dict) -> str:
    """A stable identity for one audio: the TTS reference itself, a file path, or the array object."""
    if "tts_text" in item:
        return "tts:" + json.dumps({"t": item["tts_text"], "s": item.get("tts")}, sort_keys=True)
    if "path" in item:
        return "path:" + str(item["path"])
    if "array" in item:
        return f"array:{id(item['array'])}"
    raise AudioRequestError(f"audio item has none of 'array', 'path', 'tts_text': keys {sorted(item)}")


class LSLM(TemplateLM):
    MULTIMODAL = True
    _DEFAULT_MAX_LENGTH = 2048

    def __init__(
        self,
        pretrained: str = "mini",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        audio_overflow: str = "truncate",
        fail_fast: bool = False,
        tts_engine: str | None = None,
        tts_voice: str | None = None,
        tts_rate: int | None = None,
        audio_cache_size: int = 256,
        capture: str = "none",
        capture_dir: str | None = None,
        capture_layers: str = "auto",
        capture_limit: int | None = None,
        capture_shard_size: int = 64,
        intervention: str = "none",
        intervene_layers: str = "input",
        critical: str = "bottom3",
        strength: float = 1.0,
        intervention_mode: str = "oracle",
        calibration: str | None = None,
        save_calibration: str | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise TypeError(f"lslm got unknown model_args {sorted(unknown)}")
        self.accelerator = self._init_data_parallel()
        if audio_overflow not in {"truncate", "error"}:
            raise ValueError("audio_overflow must be 'truncate' or 'error'")
        self.pretrained = str(pretrained or "mini")
        if self.accelerator is not None:  # one process per device under `accelerate launch`
            self._device = self.accelerator.device
        else:
            self._device = self._pick_device(device)
        torch_dtype = self._resolve_dtype(dtype)
        self.backend_impl = self._load_backend(
            self.pretrained, torch_dtype, revision, _as_bool(trust_remote_code)
        )
        self.backend_impl.model.to(self._device).eval()
        self.tokenizer = self.backend_impl.tokenizer
        self.revision = revision
        bs = str(batch_size)
        self.batch_size_per_gpu = int(max_batch_size or 16) if bs.startswith("auto") else int(bs)
        self._max_length = int(max_length) if max_length else None
        self.add_bos_token = None if add_bos_token is None else _as_bool(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.audio_overflow = audio_overflow
        self.fail_fast = _as_bool(fail_fast)
        self.tts_override = {
            k: v for k, v in {"engine": tts_engine, "voice": tts_voice,
                              "rate": None if tts_rate is None else int(tts_rate)}.items() if v is not None
        }
        self._audio_embeds: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._audio_cache_size = int(audio_cache_size)
        self.audio_log: dict[str, dict] = {}  # audio key -> what was done to it (fixes, errors)
        self.capture = self._make_capture(capture, capture_dir, capture_layers, capture_limit, int(capture_shard_size))
        self.intervener = None
        if intervention not in (None, "", "none"):
            from lmeval_speech.interventions.hooks import InterventionSpec, Intervener

            spec = InterventionSpec.from_args(intervention, intervene_layers, critical, strength,
                                              intervention_mode, calibration, save_calibration)
            self.intervener = Intervener(spec, self.backend_impl.decoder_layers)

    @staticmethod
    def _pick_device(device) -> torch.device:
        """``auto`` picks CUDA when present; lm-eval's CLI default ``cuda`` falls back to CPU with a warning."""
        if device in (None, "", "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            log.warning("device=%s requested but CUDA is not available: running on CPU", device)
            return torch.device("cpu")
        return dev

    # ------------------------------------------------------------------ data parallel
    def _init_data_parallel(self):
        """Under ``accelerate launch -m lm_eval`` (as lm-eval's ``hf`` model): rank and world size."""
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        from accelerate import Accelerator

        acc = Accelerator(cpu=not torch.cuda.is_available())  # gloo across CPU processes
        self._rank, self._world_size = acc.process_index, acc.num_processes
        return acc

    def all_gather(self, tensor):
        return tensor if self.accelerator is None else self.accelerator.gather(tensor.to(self.device))

    def gather_object(self, obj, dst=0):
        if self.accelerator is None:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=out, dst=dst)
        return out

    def barrier(self):
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ loading
    def _resolve_dtype(self, dtype):
        if dtype in (None, "auto"):
            return torch.float32 if self._device.type == "cpu" else "auto"
        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]

    @staticmethod
    def _load_backend(pretrained, dtype, revision, trust_remote_code):
        from lmeval_speech.mini import modeling  # noqa: F401  -- registers the mini model type
        from lmeval_speech.models.backends import backend_for_config

        if pretrained == "mini":
            from lmeval_speech.mini.build import load_mini_backend

            return load_mini_backend(dtype=dtype)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        cls = backend_for_config(config)
        return cls.from_pretrained(pretrained, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)

    def _make_capture(self, mode, capture_dir, layers, limit, shard_size):
        from lmeval_speech.capture.recorder import HiddenStateCapture

        if mode in (None, "", "none", False):
            return None
        if not capture_dir:
            raise ValueError("capture needs capture_dir=PATH (give the same folder to `lmeval-speech report`)")
        return HiddenStateCapture(
            mode=mode, root=capture_dir, n_layers=len(self.backend_impl.decoder_layers), layers=layers,
            token_limit=None if limit in (None, "") else int(limit), rank=self.rank, shard_size=shard_size,
            meta={"pretrained": self.pretrained, "backend": type(self.backend_impl).__name__},
        )

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def model(self):
        return self.backend_impl.model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(self.model.config, self.tokenizer, default=self._DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.pretrained)).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False:
            return None
        return chat_template if isinstance(chat_template, str) else self.tokenizer.chat_template

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs):
        kw = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **kw)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens, skip_special_tokens=True):
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ audio
    @staticmethod
    def _audio_items(args) -> list[dict]:
        extra = args[2] if len(args) > 2 else None
        if not extra:
            return []
        items = extra.get("audio") if isinstance(extra, dict) else None
        if items is None:
            return []
        return list(items) if isinstance(items, (list, tuple)) else [items]

    def _place_audio(self, context: str, n_audio: int) -> str:
        """Swap each ``<audio>`` marker for the backend's placeholder (audio first if none)."""
        b = self.backend_impl
        found = context.count(AUDIO_MARKER)
        if found == 0:
            return b.audio_placeholder * n_audio + context
        if found != n_audio:
            raise AudioRequestError(f"prompt has {found} {AUDIO_MARKER} markers but the request carries {n_audio} audios")
        return context.replace(AUDIO_MARKER, b.audio_placeholder)

    def _load_audio(self, item: dict):
        """(array at 16 kHz, notes) for one audio item, after the documented fix-ups."""
        from lmeval_speech.audio import prepare_audio, resolve_audio

        array, sr, info = resolve_audio(item, override=self.tts_override or None)
        b = self.backend_impl
        limit = b.max_audio_seconds if self.audio_overflow == "truncate" else None
        array, fixes = prepare_audio(array, sr, target_rate=b.sampling_rate, max_seconds=limit)
        if self.audio_overflow == "error" and len(array) > b.max_audio_seconds * b.sampling_rate:
            raise AudioRequestError(f"audio of {len(array) / b.sampling_rate:.1f}s exceeds {b.max_audio_seconds}s")
        return array, {**info, "fixes": list(info.get("fixes", [])) + fixes, "seconds": len(array) / b.sampling_rate}

    def _plan_audio(self, items: dict[str, dict]) -> dict[str, int]:
        """Resolve every distinct audio once (synthesizing cache misses) and count its tokens."""
        b = self.backend_impl
        if items and not b.supports_audio:
            raise AudioRequestError(
                f"{type(b).__name__} ({self.pretrained}) takes no audio; speech tasks need a speech LLM "
                "(see lmeval_speech.models.backends.SPEECH_BACKENDS)"
            )
        n_tokens = {}
        for key, item in tqdm(items.items(), desc="Preparing audio", disable=len(items) < 2 or self.rank != 0):
            try:
                array, notes = self._load_audio(item)
            except Exception as err:  # one bad item must not end a long run
                if self.fail_fast:
                    raise
                self.audio_log[key] = {"error": f"{type(err).__name__}: {err}"}
                log.error("audio item skipped (scored -inf): %s", self.audio_log[key]["error"])
                continue
            self.audio_log[key] = notes
            if getattr(b, "content_dependent_audio_tokens", False):  # the count is the encoded length
                if key not in self._audio_embeds:
                    self._audio_embeds[key] = b.encode_audio([array])[0]
                n_tokens[key] = int(self._audio_embeds[key].shape[0])
            else:
                n_tokens[key] = self.backend_impl.num_audio_tokens(len(array))
        return n_tokens

    def _speech_embeddings(self, keys: list[str], items: dict[str, dict]) -> dict[str, torch.Tensor]:
        missing = [k for k in dict.fromkeys(keys) if k not in self._audio_embeds]
        if missing:
            arrays = [self._load_audio(items[k])[0] for k in missing]
            for k, emb in zip(missing, self.backend_impl.encode_audio(arrays), strict=True):
                self._audio_embeds[k] = emb
        out = {}
        for k in keys:
            self._audio_embeds.move_to_end(k)
            out[k] = self._audio_embeds[k]
        while len(self._audio_embeds) > self._audio_cache_size:
            self._audio_embeds.popitem(last=False)
        return out

    # ------------------------------------------------------------------ sequence building
    def _expand(self, tokens: list[int], keys: list[str], n_tokens: dict[str, int]):
        """Replace the k-th audio token with n_tokens[keys[k]] copies; return tokens and spans."""
        audio_id = self.backend_impl.audio_token_id
        out, spans, k = [], [], 0
        for t in tokens:
            if t == audio_id and k < len(keys):
                spans.append((len(out), keys[k]))
                out.extend([audio_id] * n_tokens[keys[k]])
                k += 1
            else:
                out.append(t)
        if k != len(keys):
            raise AudioRequestError(f"tokenized prompt holds {k} audio placeholders for {len(keys)} audios")
        return out, spans

    def _build_sequence(self, index, context, continuation, keys, n_tokens, request=None) -> _Seq:
        if context == "":
            cont_enc = self.tok_encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != cont_enc[0]:
                ctx_enc = [self.prefix_token_id]
            else:
                ctx_enc, cont_enc = cont_enc[:1], cont_enc[1:]
        else:
            ctx_enc, cont_enc = self._encode_pair(context, continuation)
        whole, spans = self._expand(ctx_enc + cont_enc, keys, n_tokens)
        inp = whole[-(self.max_length + 1):][:-1]
        cut = len(whole) - 1 - len(inp)
        if cut and spans and spans[0][0] < cut:
            raise AudioRequestError(
                f"sequence of {len(whole)} tokens exceeds max_length={self.max_length} inside the audio; "
                "raise max_length or shorten the prompt"
            )
        spans = [(s - cut, k) for s, k in spans]
        seq = _Seq(index, inp, cont_enc, spans, request)
        if not keys and request is not None and (self.capture is not None or self.intervener is not None):
            seq.span = self._text_span(context, request.doc, cut)
            if self.capture is not None and self.capture.wants(request, False):
                seq.capture = seq.span
        return seq

    def _text_span(self, context: str, doc, cut: int) -> tuple[int, int]:
        """Token positions of the twin's spoken content (see capture.positions), after truncation."""
        from lmeval_speech.capture.positions import question_char_span

        start, end = question_char_span(context, doc)
        lo, hi = len(self.tok_encode(context[:start])), len(self.tok_encode(context[:end]))
        return max(0, lo - cut), max(0, hi - cut)

    # ------------------------------------------------------------------ forward
    def _embed(self, seqs: list[_Seq], items):
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
        keys = [k for s in seqs for _, k in s.audio]
        if keys:
            speech = self._speech_embeddings(keys, items)
            embeds = embeds.clone()
            for i, s in enumerate(seqs):
                for start, k in s.audio:
                    e = speech[k]
                    embeds[i, start : start + e.shape[0]] = e.to(embeds.dtype)
        return ids, mask, embeds

    def _intervening(self, batch: list[_Seq], embeds):
        """Text twins record their reference states; speech rows get edited (see interventions.hooks)."""
        import contextlib

        from lmeval_speech.capture.positions import pair_and_modality

        iv = self.intervener
        if iv is None:
            return contextlib.nullcontext()
        rows = []
        for s in batch:
            key = None if s.request is None else (pair_and_modality(s.request.task_name, bool(s.audio))[0], s.request.doc_id)
            if s.audio:
                rows.append((key, self._speech_positions(s)))
            elif s.span is not None and s.request.idx == 0 and iv.spec.mode == "oracle":
                rows.append((key, list(range(*s.span))))
            else:
                rows.append(None)
        if any(s.audio for s in batch):
            return iv.editing_speech([r if s.audio else None for r, s in zip(rows, batch)], embeds)
        return iv.recording_text(rows, embeds)

    def _captures(self, s: _Seq) -> bool:
        return self.capture is not None and (s.capture is not None or (bool(s.audio) and self.capture.wants(s.request, True)))

    def _speech_positions(self, s: _Seq) -> list[int]:
        """Positions that hold speech embeddings in this sequence (valid while its batch runs)."""
        return [p for start, k in s.audio for p in range(start, start + self._audio_embeds[k].shape[0])]

    def _capture_row(self, s: _Seq, hidden_states, row: int) -> None:
        if s.audio:
            positions = self._speech_positions(s)
            audio_notes = [self.audio_log.get(k, {}) for _, k in s.audio]
        else:
            positions = list(range(*s.capture))
            audio_notes = []
        self.capture.add(s.request, bool(s.audio), [h[row] for h in hidden_states], positions, audio_notes)

    @torch.no_grad()
    def _score(self, seqs: list[_Seq], items, desc: str, disable_tqdm=False, on_batch=None):
        """Log-likelihood and greedy flag of each sequence's continuation, in ``seqs`` order.

        ``on_batch([(seq, result), ...])`` runs after every batch, so results can be persisted as
        they come (lm-eval's ``--use_cache``) and an interrupted run loses at most one batch.
        """
        results: dict[int, tuple[float, bool]] = {}
        # Sequences with the same model input (e.g. the four one-token choices " A".." D" of an
        # item) share one forward pass; each then reads its own continuation's log-probabilities.
        shared: dict[tuple, list[_Seq]] = {}
        for s in seqs:
            shared.setdefault((tuple(s.tokens), tuple(s.audio)), []).append(s)
        groups = list(shared.values())
        order = sorted(range(len(groups)), key=lambda i: (-len(groups[i][0].tokens) - max(len(s.cont) for s in groups[i]), i))
        bs = max(1, self.batch_size)
        pbar = tqdm(total=len(seqs), desc=desc, disable=disable_tqdm or self.rank != 0)
        for start in range(0, len(order), bs):
            batch_groups = [groups[i] for i in order[start : start + bs]]
            batch = [g[0] for g in batch_groups]
            ids, mask, embeds = self._embed(batch, items)
            # every sequence of a shared group that wants capture (e.g. two items with the same
            # question text) is recorded from the one forward pass
            rows = [(r, s) for r, g in enumerate(batch_groups) for s in g if self._captures(s)]
            with self._intervening(batch, embeds):
                out = self.backend_impl.run_decoder(embeds, mask, ids, output_hidden_states=bool(rows))
            for r, s in rows:
                self._capture_row(s, out.hidden_states, r)
            done = []
            for row, group in enumerate(batch_groups):
                for s in group:
                    n, c = len(s.tokens), len(s.cont)
                    logp = F.log_softmax(self.backend_impl.logits(out.last_hidden[row, n - c : n]).float(), dim=-1)
                    cont = torch.tensor(s.cont, device=logp.device)
                    ll = float(logp.gather(1, cont[:, None]).sum())
                    results[id(s)] = (ll, bool((logp.argmax(-1) == cont).all()))
                    done.append((s, results[id(s)]))
            pbar.update(len(done))
            if on_batch is not None:
                on_batch(done)
            _maybe_inject_fault()
        pbar.close()
        return [results[id(s)] for s in seqs]

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        items: dict[str, dict] = {}
        per_request = []
        for req in requests:
            audio = self._audio_items(req.args)
            keys = [audio_key(a) for a in audio]
            items.update(zip(keys, audio))
            per_request.append(keys)
        n_tokens = self._plan_audio(items)

        seqs, out = [], [None] * len(requests)
        for i, (req, keys) in enumerate(zip(requests, per_request, strict=True)):
            context, continuation = req.args[0], req.args[1]
            if any(k not in n_tokens for k in keys):  # its audio failed: logged above
                out[i] = (float("-inf"), False)
                continue
            if keys:
                context = self._place_audio(context, len(keys))
            seqs.append(self._build_sequence(i, context, continuation, keys, n_tokens, req))
        # With an intervention, text twins run first: they are the oracle's references.
        phases = [seqs] if self.intervener is None else [[s for s in seqs if not s.audio], [s for s in seqs if s.audio]]
        pending = []

        def persist(batch_results, final=False):
            # A result enters lm-eval's cache only once its captured states are on disk too, so a
            # rerun after a kill never takes a cached answer whose hidden states were lost.
            pending.extend(batch_results)
            if final and self.capture is not None:
                self.capture.flush()
            if self.capture is None or self.capture.is_flushed():
                for s, res in pending:
                    self.cache_hook.add_partial("loglikelihood", requests[s.index].args, res)
                pending.clear()

        for phase in phases:
            for s, res in zip(phase, self._score(phase, items, "Running loglikelihood requests", disable_tqdm, persist), strict=True):
                out[s.index] = res
        persist([], final=True)
        if self.intervener is not None:
            self.intervener.save_calibration()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """TemplateLM's token-level entry point (text only), for callers that pre-tokenize."""
        seqs = []
        for i, (_, ctx_enc, cont_enc) in enumerate(requests):
            whole = ctx_enc + cont_enc
            seqs.append(_Seq(i, whole[-(self.max_length + 1):][:-1], cont_enc))
        return self._score(seqs, {}, "Running loglikelihood requests", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for req in tqdm(requests, desc="Running loglikelihood_rolling requests", disable=disable_tqdm or self.rank != 0):
            if self._audio_items(req.args):
                raise AudioRequestError("loglikelihood_rolling scores text only; drop doc_to_audio from the task")
            (string,) = req.args[:1]
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            )
            pre = [((None, None), ctx, cont) for ctx, cont in windows]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(pre, disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        b = self.backend_impl
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        out = []
        for req in tqdm(requests, desc="Running generate_until requests", disable=disable_tqdm or self.rank != 0):
            context, gen_kwargs = req.args[0], dict(req.args[1])
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)
            audio = self._audio_items(req.args)
            keys = [audio_key(a) for a in audio]
            items = dict(zip(keys, audio))
            n_tokens = self._plan_audio(items)
            if any(k not in n_tokens for k in keys):
                out.append("")
                continue
            if keys:
                context = self._place_audio(context, len(keys))
            tokens, spans = self._expand(self.tok_encode(context), keys, n_tokens)
            cut = max(0, len(tokens) - (self.max_length - max_new))
            if cut and spans and spans[0][0] < cut:
                raise AudioRequestError(f"prompt of {len(tokens)} tokens leaves no room for the audio within max_length")
            seq = _Seq(0, tokens[cut:], [], [(s - cut, k) for s, k in spans])
            _, mask, embeds = self._embed([seq], items)
            gen = b.language_model.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new,
                pad_token_id=self.tokenizer.pad_token_id or self.eot_token_id, **kwargs,
            )
            text = postprocess_generated_text(self.tok_decode(gen[0].tolist()), stop=until, think_end_token=None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
        return out
