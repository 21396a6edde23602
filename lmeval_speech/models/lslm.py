"""Owns ``lslm``, lm-eval's model class for speech LLMs (and their text twins): model args, loading, the
tokenizer side of lm-eval's API and ``loglikelihood``. Its other jobs are mixins, one module each:
the run's record (``models/record.py``), data parallel (``models/distributed.py``), chat templates
(``models/chat.py``), ``generate_until`` and ``loglikelihood_rolling`` (``models/generation.py``).

A request is ``(context, continuation[, {"audio": [...]}])``. ``models/plan.py`` turns requests into
sequences (audio resolved once and keyed by content, failures and truncations recorded, spans);
``models/runner.py`` runs them in batches under the capture and intervention hooks. An item whose
audio failed is returned as NaN carrying its reason (``outcomes.py``), never as a score. Text-only
requests follow lm-eval's ``hf`` model token for token (``_encode_pair``, left truncation, right
padding), which the parity test checks.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    _add_special_kwargs,
    has_bos_prefix,
)

from lmeval_speech import AUDIO_MARKER, outcomes
from lmeval_speech.models.backends.placement import place, placement_kwargs
from lmeval_speech.models.chat import ChatPrompts
from lmeval_speech.models.distributed import DataParallel
from lmeval_speech.models.generation import Generation
from lmeval_speech.audio.resolver import AudioResolver, AudioSettings, Listener
from lmeval_speech.models.plan import (
    AudioRequestError,
    Planner,
    PromptTokens,
    Seq,
    audio_items,
    audio_key,
    check_voice_language,
)
from lmeval_speech.models.record import RunRecord, model_identity
from lmeval_speech.models.runner import BatchRunner, SpeechEmbeddings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in {"1", "true", "yes", "on"}


class LSLM(RunRecord, DataParallel, ChatPrompts, Generation, BatchRunner, TemplateLM):
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
        max_audio_seconds: float | None = None,
        fail_fast: bool = False,
        tts_engine: str | None = None,
        tts_voice: str | None = None,
        tts_rate: int | None = None,
        voice_language: str = "task",
        noise: str | None = None,
        snr_db: float | None = None,
        noise_seed: int = 0,
        audio_cache_size: int = 8192,
        prefix_cache: bool = True,
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
        system_prompt: str = "card",
        **unknown,
    ):
        super().__init__()
        asr = unknown.pop("asr", None)  # the cascade twin's ASR for every cascade item (audio/asr.effective_spec)
        load = placement_kwargs(unknown)  # parallelize / device_map / max memory / offload / attn_implementation
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
        self.backend_impl = self._load_backend(self.pretrained, torch_dtype, revision, _as_bool(trust_remote_code), **load)
        self._device = place(self.backend_impl.model, self._device)  # a device map keeps its placement
        self.tokenizer = self.backend_impl.tokenizer
        if hasattr(self.backend_impl, "check_logits"):  # text-only families: parity with their own forward
            self.backend_impl.check_logits()
        self.revision = revision
        bs = str(batch_size)
        self.batch_size_per_gpu = int(max_batch_size or 16) if bs.startswith("auto") else int(bs)
        self._max_length = int(max_length) if max_length else None
        self.add_bos_token = None if add_bos_token is None else _as_bool(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        # at most the backend's own limit; lower it to compare models on the same audio length
        limit = self.backend_impl.max_audio_seconds
        tts_override = {k: v for k, v in {"engine": tts_engine, "voice": tts_voice, "rate": None if tts_rate
                                          is None else int(tts_rate)}.items() if v is not None}
        if "engine" in tts_override:  # an impossible rate, or a voice the engine lacks, stops here
            # (with the task's own engine unknown until its items are resolved, the first item checks it)
            from lmeval_speech.audio import TTSSpec
            from lmeval_speech.audio.tts import get_engine

            spec = TTSSpec().with_overrides(**tts_override)
            get_engine(spec.engine).check_voice(spec.voice)
        self.voice_language = voice_language  # "any": a tts_voice of another language than the task's is allowed
        self._chat_applied = self._chat_warned = False
        noise_spec = None
        if noise not in (None, "", "none"):
            from lmeval_speech.audio.noise import NoiseSpec

            if snr_db in (None, ""):
                raise ValueError("noise=... needs snr_db=DB (the signal-to-noise ratio of the mixed audio)")
            noise_spec = NoiseSpec(str(noise), float(snr_db), int(noise_seed))
        self.audio_settings = AudioSettings(
            tts_override=tts_override, noise=noise_spec, audio_overflow=audio_overflow, asr=asr,
            max_audio_seconds=limit if max_audio_seconds in (None, "") else min(float(max_audio_seconds), limit),
            fail_fast=_as_bool(fail_fast))
        self.embeddings = SpeechEmbeddings(self.backend_impl, audio_cache_size)
        self.prefix_cache = _as_bool(prefix_cache)
        window = self._sliding_window()
        if self.prefix_cache and window:
            # continuations sit at cache index (widest prefix in the batch) + j, and a sliding-window mask
            # counts cache indices, not positions: a short prefix batched with a long one would lose
            # tokens inside its real window (scores changed with batch composition)
            log.info("prefix_cache off: %s attends through a sliding window of %d tokens", self.pretrained, window)
            self.prefix_cache = False
        b = self.backend_impl
        counts = (lambda key, a: self.embeddings.count(key, a)) if getattr(b, "content_dependent_audio_tokens", False) \
            else (lambda key, a: b.count_tokens(len(a)))
        self.audio = AudioResolver(self.audio_settings, Listener(
            sampling_rate=b.sampling_rate, supports_audio=b.supports_audio, count=counts,
            windows=lambda n: len(b._segments(n)), name=f"{type(b).__name__} ({self.pretrained})"),
            progress=self.rank == 0)
        self.planner = Planner(PromptTokens(
            tokenizer=self.tokenizer, encode=self.tok_encode, encode_pair=self._encode_pair,
            special_token_kwargs=self.special_token_kwargs, prefix_token_id=self.prefix_token_id,
            max_length=self.max_length, audio_placeholder=b.audio_placeholder, audio_token_id=b.audio_token_id),
            self.audio)
        self.identity = model_identity(self.pretrained, revision, self.backend_impl, self._device)
        if system_prompt not in {"card", "template"}:
            raise ValueError(f"system_prompt={system_prompt!r}: 'card' (the system prompt of the model card's own "
                             "examples, where the backend knows one) or 'template' (the chat template's default)")
        # the system turn rendered under --apply_chat_template (None: the template's own default)
        self.system_prompt = self.backend_impl.card_system_prompt if system_prompt == "card" else None
        if self.system_prompt is not None:  # what --apply_chat_template puts first (no effect without it)
            self.identity["chat_system_prompt"] = self.system_prompt
        self.intervener = None
        if intervention not in (None, "", "none"):
            from lmeval_speech.interventions.hooks import InterventionSpec, Intervener

            spec = InterventionSpec.from_args(intervention, intervene_layers, critical, strength,
                                              intervention_mode, calibration, save_calibration)
            self.intervener = Intervener(spec, len(self.backend_impl.decoder_layers))
        self.capture = self._make_capture(capture, capture_dir, capture_layers, capture_limit, int(capture_shard_size))

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
    def _load_backend(pretrained, dtype, revision, trust_remote_code, **load):
        from lmeval_speech.models.backends import NAMED_BACKENDS, NAMED_PATHS, backend_for_config, load_plugins, resolve

        load_plugins()  # model types registered with transformers' Auto classes (the embedded model's)
        if pretrained in NAMED_BACKENDS:  # pretrained=mini: the embedded model, built by its own package
            return resolve(NAMED_BACKENDS[pretrained])(dtype=dtype)
        if pretrained in NAMED_PATHS:  # mini-base: the embedded model's base LLM (SmolLM2-135M-Instruct), for --base
            pretrained = str(resolve(NAMED_PATHS[pretrained])())
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        cls = backend_for_config(config)
        return cls.from_pretrained(pretrained, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, **load)

    def _make_capture(self, mode, capture_dir, layers, limit, shard_size):
        from lmeval_speech.capture.recorder import HiddenStateCapture

        if mode in (None, "", "none", False):
            return None
        if not capture_dir:
            raise ValueError("capture needs capture_dir=PATH (give the same folder to `lmeval-speech report`)")
        return HiddenStateCapture(
            mode=mode, root=capture_dir, n_layers=len(self.backend_impl.decoder_layers), layers=layers,
            token_limit=None if limit in (None, "") else int(limit), rank=self.rank, shard_size=shard_size,
            identity=self.identity, conditions=self.conditions(),
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
    def batch_size(self) -> int:  # one sequence a pass where the scores depend on the batch (LongRoPE)
        return self.batch_size_per_gpu if self.backend_impl.batch_independent else 1

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.pretrained)).replace("/", "__")

    def _sliding_window(self) -> int | None:
        """The decoder's sliding attention window, when it has one in use (Mistral, Qwen2 with
        ``use_sliding_window``, Gemma 2/3's local layers)."""
        config = self.backend_impl.language_model.config
        config = getattr(config, "text_config", None) or config
        window = getattr(config, "sliding_window", None)
        # a continuation sits at most 2 x max_length cache slots from its prefix's start (prefixes are
        # right-padded to the batch's widest): a window at least that wide never drops a token (Phi-3/4)
        if not window or getattr(config, "use_sliding_window", True) is False or int(window) >= 2 * self.max_length:
            return None
        return int(window)

    def special_token_kwargs(self, string: str, add_special_tokens=None) -> dict:
        """lm-eval ``hf``'s rule for adding BOS (shared by ``tok_encode`` and the span offsets)."""
        kw = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        return kw

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs):
        enc = self.tokenizer.encode(string, **self.special_token_kwargs(string, add_special_tokens))
        bos = self.tokenizer.bos_token_id
        if self.backend_impl.requires_bos and add_special_tokens is not False and bos is not None \
                and (not enc or enc[0] != bos):
            enc = [bos] + list(enc)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens, skip_special_tokens=True):
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ lm-eval API
    def _plan(self, requests):
        """Audio keys per request and each distinct audio's outcome (resolved once). Stops before any audio is
        synthesized at a prompt whose ``<audio>`` markers do not match its audios, or a voice of another language."""
        self._warn_if_instruct_without_chat_template()
        items: dict[str, dict] = {}
        per_request = []
        key_of: dict[int, str] = {}  # the choices of an item share one audio dict: hash its samples once
        for req in requests:
            audio = audio_items(req.args)
            cascade = any(isinstance(a, dict) and a.get("transcribe") is not None for a in audio)
            allowed = (len(audio),) if self._chat_applied and not cascade else (0, len(audio))
            if audio and req.args[0].count(AUDIO_MARKER) not in allowed:
                self.planner.place_audio(req.args[0], len(audio), self._chat_applied)  # raises the clear error
            keys = [key_of[id(a)] if id(a) in key_of else key_of.setdefault(id(a), audio_key(a)) for a in audio]
            items.update(zip(keys, audio))
            per_request.append(keys)
        check_voice_language(self.audio_settings.tts_override, self.voice_language == "any", requests, per_request)
        return items, per_request, self.audio.resolve(items)

    def _with_cut(self, truncated: str, cut: int, total: int) -> str:
        """A prompt cut to fit ``max_length`` is marked like a cut audio: its twin heard or read the
        whole question, so the pair is not compared (excluded and counted by default)."""
        note = f"prompt cut: its first {cut} of {total} tokens dropped to fit max_length={self.max_length}"
        return "; ".join(filter(None, [truncated, note]))

    @staticmethod
    def _outcome(keys, status) -> tuple[str, str]:
        """(failure reason, truncation note) of a request from its audios' outcomes."""
        errors = [status[k].error for k in keys if status[k].error]
        cuts = [status[k].truncated for k in keys if status[k].truncated]
        return "; ".join(errors), "; ".join(cuts)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        items, per_request, status = self._plan(requests)
        seqs, out, marks = [], [None] * len(requests), {}
        want_span = self.capture is not None or self.intervener is not None
        for i, (req, keys) in enumerate(zip(requests, per_request, strict=True)):
            failed, truncated = self._outcome(keys, status)
            if failed:  # never a score: the task's process_results leaves it out and counts it
                out[i] = outcomes.failed(failed)
                continue
            try:
                seqs.append(self.planner.build(i, req.args[0], req.args[1], keys, req, want_span, self._chat_applied))
            except AudioRequestError as err:  # e.g. the audio does not fit max_length: this item only
                if self.audio_settings.fail_fast or not keys:
                    raise
                out[i] = outcomes.failed(f"AudioRequestError: {err}")
                continue
            if seqs[-1].cut:
                truncated = self._with_cut(truncated, seqs[-1].cut, len(seqs[-1].tokens) + seqs[-1].cut + 1)
            transcript = seqs[-1].transcript
            if truncated or transcript:
                marks[i] = (truncated, transcript)
        self._collect_lens_ids(seqs)
        phases = [seqs] if self.intervener is None else self._oracle_phases(seqs)
        if self.backend_impl.modality_dependent:  # never one batch of audio and text rows (Granite's LoRA)
            phases = [part for ph in phases for part in ([s for s in ph if not s.audio], [s for s in ph if s.audio]) if part]
        pending = []

        def mark(index, res):
            if index not in marks:
                return res
            truncated, transcript = marks[index]
            return (outcomes.Scored(res[0], truncated=truncated, transcript=transcript), res[1])

        def persist(batch_results, final=False):
            # A result enters lm-eval's cache only once its captured states are on disk too, so a
            # rerun after a kill never takes a cached answer whose hidden states were lost.
            pending.extend(batch_results)
            if final and self.capture is not None:
                self.capture.flush()
            if self.capture is None or self.capture.is_flushed():
                for s, res in pending:
                    self.cache_hook.add_partial("loglikelihood", requests[s.index].args, mark(s.index, res))
                pending.clear()

        for phase in phases:
            for s, res in zip(phase, self._score(phase, items, "Running loglikelihood requests", disable_tqdm, persist), strict=True):
                out[s.index] = mark(s.index, res)
        persist([], final=True)
        if self.intervener is not None:
            self.intervener.save_calibration(self)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """TemplateLM's token-level entry point (text only), for callers that pre-tokenize."""
        seqs = []
        for i, (_, ctx_enc, cont_enc) in enumerate(requests):
            whole = ctx_enc + cont_enc
            seqs.append(Seq(i, whole[-(self.max_length + 1):][:-1], cont_enc))
        return self._score(seqs, {}, "Running loglikelihood requests", disable_tqdm)
