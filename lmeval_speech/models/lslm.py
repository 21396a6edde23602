"""Owns ``lslm``, lm-eval's model class for speech LLMs (and their text twins): model args, loading,
data-parallel set-up and lm-eval's API (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``, chat templates).

A request is ``(context, continuation[, {"audio": [...]}])``. ``models/plan.py`` turns requests into
sequences (audio resolved once and keyed by content, failures and truncations recorded, spans);
``models/runner.py`` runs them in batches under the capture and intervention hooks. An item whose
audio failed is returned as NaN carrying its reason (``outcomes.py``), never as a score. Text-only
requests follow lm-eval's ``hf`` model token for token (``_encode_pair``, left truncation, right
padding), which the parity test checks.
"""

from __future__ import annotations

import json
import logging

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from lmeval_speech import AUDIO_MARKER, outcomes
from lmeval_speech.audio.spoken_form import VERSION as SPOKEN_FORM_VERSION
from lmeval_speech.capture.store import mismatch
from lmeval_speech.models.backends.placement import place, placement_kwargs
from lmeval_speech.models.plan import AudioRequestError, Planner, Seq, audio_items, audio_key
from lmeval_speech.models.runner import BatchRunner, SpeechEmbeddings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in {"1", "true", "yes", "on"}


def model_identity(pretrained: str, revision, backend, device) -> dict:
    """What identifies the weights that produced a number: path or hub id, revision, backend, dtype,
    and SHA-256 of the model config (and of the trained adapter, for the embedded model)."""
    import hashlib

    model = backend.model
    config = model.config.to_json_string(use_diff=False)
    ident = {"pretrained": pretrained, "revision": revision, "backend": type(backend).__name__,
             "model_type": getattr(model.config, "model_type", None),
             "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": str(device),
             "config_sha256": hashlib.sha256(config.encode()).hexdigest()}
    adapter = getattr(backend, "adapter_file", None)
    if adapter:
        with open(adapter, "rb") as f:
            ident["adapter_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return ident


class LSLM(BatchRunner, TemplateLM):
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
        noise: str | None = None,
        snr_db: float | None = None,
        noise_seed: int = 0,
        audio_cache_size: int = 256,
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
        self.asr = unknown.pop("asr", None)  # the cascade twin's ASR for every cascade item (audio/asr.effective_spec)
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
        self.audio_overflow = audio_overflow
        # at most the backend's own limit; lower it to compare models on the same audio length
        limit = self.backend_impl.max_audio_seconds
        self.max_audio_seconds = limit if max_audio_seconds in (None, "") else min(float(max_audio_seconds), limit)
        self.fail_fast = _as_bool(fail_fast)
        self.tts_override = {
            k: v for k, v in {"engine": tts_engine, "voice": tts_voice,
                              "rate": None if tts_rate is None else int(tts_rate)}.items() if v is not None
        }
        if "engine" in self.tts_override:  # an impossible rate, or a voice the engine lacks, stops here
            # (with the task's own engine unknown until its items are resolved, the first item checks it)
            from lmeval_speech.audio import TTSSpec
            from lmeval_speech.audio.tts import get_engine

            spec = TTSSpec().with_overrides(**self.tts_override)
            get_engine(spec.engine).check_voice(spec.voice)
        self._chat_applied = self._chat_warned = False
        self.noise = None
        if noise not in (None, "", "none"):
            from lmeval_speech.audio.noise import NoiseSpec

            if snr_db in (None, ""):
                raise ValueError("noise=... needs snr_db=DB (the signal-to-noise ratio of the mixed audio)")
            self.noise = NoiseSpec(str(noise), float(snr_db), int(noise_seed))
        self.embeddings = SpeechEmbeddings(self.backend_impl, audio_cache_size)
        self.prefix_cache = _as_bool(prefix_cache)
        window = self._sliding_window()
        if self.prefix_cache and window:
            # continuations sit at cache index (widest prefix in the batch) + j, and a sliding-window mask
            # counts cache indices, not positions: a short prefix batched with a long one would lose
            # tokens inside its real window (scores changed with batch composition)
            log.info("prefix_cache off: %s attends through a sliding window of %d tokens", self.pretrained, window)
            self.prefix_cache = False
        self.planner = Planner(self)
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
    def _load_backend(pretrained, dtype, revision, trust_remote_code, **load):
        from lmeval_speech.mini import modeling  # noqa: F401  -- registers the mini model type
        from lmeval_speech.models.backends import backend_for_config

        if pretrained == "mini":
            from lmeval_speech.mini.build import load_mini_backend

            return load_mini_backend(dtype=dtype)
        if pretrained == "mini-base":  # the embedded model's base LLM (SmolLM2-135M-Instruct), for --base
            from lmeval_speech.mini.build import smollm2_fp32_dir

            pretrained = str(smollm2_fp32_dir())
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

    def conditions(self) -> dict:
        """The run settings besides the model and the prompts that change what is scored or captured:
        a capture dir or ``--use_cache`` database made under other conditions is refused."""
        intervention = None
        if self.intervener is not None:  # where its calibration is saved changes no number
            intervention = {k: v for k, v in self.intervener.spec.to_dict().items() if k != "save_calibration"}
        conditions = {"tts_override": self.tts_override or None,
                      "noise": None if self.noise is None else self.noise.to_dict(),
                      "intervention": intervention,
                      "audio_overflow": self.audio_overflow, "max_audio_seconds": self.max_audio_seconds,
                      "max_length": self.max_length, "add_bos_token": self.add_bos_token,
                      "prefix_token_id": self.custom_prefix_token_id,
                      "spoken_form": SPOKEN_FORM_VERSION}  # how TTS texts are rewritten before synthesis
        return json.loads(json.dumps(conditions))  # as stored (JSON), so a reread compares equal

    @property
    def audio_log(self) -> dict[str, dict]:
        """Audio key -> what was done to it (fix-ups, truncation) or why it was not scored."""
        return {k: ({"error": st.error} if st.error else st.notes) for k, st in self.planner.status.items()}

    #: The record ``lslm`` keeps in lm-eval's ``--use_cache`` database (lm-eval keys results by request only).
    CACHE_CONDITIONS_KEY = "lmeval_speech:conditions"

    def set_cache_hook(self, cache_hook) -> None:
        """lm-eval's ``--use_cache`` keys each result by its request alone, so a rerun with another model,
        ``tts_voice``, ``noise`` or intervention would take the first run's numbers. The database records
        the model and conditions it was made under; another run's is refused, as is a database that has
        results but no such record (made by another model or an older version)."""
        super().set_cache_hook(cache_hook)
        db = getattr(cache_hook, "dbdict", None)
        if db is None:
            return
        mine = {"model": {k: v for k, v in self.identity.items() if k != "device"}, **self.conditions()}
        stored = db.get(self.CACHE_CONDITIONS_KEY)
        if stored is None and len(db):
            raise ValueError(f"--use_cache database {db.filename} holds {len(db)} results made without lmeval_speech's "
                             "record of their model and settings (another model, or an older version): use a new "
                             "--use_cache path")
        if stored is None:
            db[self.CACHE_CONDITIONS_KEY] = mine
            return
        flat = lambda d: {**{f"model.{k}": v for k, v in d.get("model", {}).items()},  # noqa: E731
                          **{k: v for k, v in d.items() if k != "model"}}
        differ = mismatch(flat(stored), flat(mine))
        if differ:
            raise ValueError(f"--use_cache database {db.filename} holds results made under other settings "
                             f"({differ[0]}); this run has {differ[1]}: its cached numbers are not this "
                             "run's. Use a new --use_cache path per model and condition")

    def get_model_info(self) -> dict:
        """lm-eval writes this into ``results["config"]``: the model's side of the run manifest."""
        return {"lmeval_speech": {
            "model": self.identity,
            "settings": {"audio_overflow": self.audio_overflow, "max_audio_seconds": self.max_audio_seconds,
                         "tts_override": self.tts_override or None, "fail_fast": self.fail_fast,
                         "noise": None if self.noise is None else self.noise.to_dict(),
                         "max_length": self.max_length, "batch_size": self.batch_size,
                         "spoken_form": SPOKEN_FORM_VERSION},
            "hooks": {"capture": None if self.capture is None else self.capture.spec(),
                      "intervention": None if self.intervener is None else self._intervention_manifest()},
        }}

    def _intervention_manifest(self) -> dict:
        iv, n = self.intervener, len(self.backend_impl.decoder_layers)
        hooks = {"edit": iv.hook_spec("edit").to_dict(n)}
        if iv.spec.mode == "oracle":
            hooks["read"] = iv.hook_spec("read").to_dict(n)
        return {**iv.spec.to_dict(), "hooks": hooks}

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

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template text lm-eval records (and hashes): the processor's when it has one (see
        ``models/chat.py``), else the tokenizer's default or the one named (``--apply_chat_template NAME``)."""
        if chat_template is False or chat_template is None:
            return None
        # lm-eval asks for the template's text whenever --apply_chat_template is given, also when its requests
        # come from --cache_requests and apply_chat_template itself is never called
        self._chat_applied = True
        from lmeval_speech.models.chat import template_owner

        owner = template_owner(self.backend_impl)
        if owner is not self.tokenizer and chat_template is True:
            return owner.chat_template
        try:
            return self.tokenizer.get_chat_template(None if chat_template is True else chat_template)
        except NotImplementedError:  # mistral-common (Voxtral) renders its own format and exposes no template text
            if chat_template is not True:
                raise
            return f"{type(self.tokenizer).__name__}: the tokenizer's own chat format (no template text)"

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        from lmeval_speech.models.chat import render

        self._chat_applied = True
        return render(self.backend_impl, chat_history, add_generation_prompt, system=self.system_prompt)

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
        """Audio keys per request and each distinct audio's outcome (resolved once). A prompt whose
        ``<audio>`` markers do not match its audios (few-shot exemplars of a speech twin) stops the
        run here, before any audio is synthesized."""
        self._warn_if_instruct_without_chat_template()
        items: dict[str, dict] = {}
        per_request = []
        key_of: dict[int, str] = {}  # the choices of an item share one audio dict: hash its samples once
        for req in requests:
            audio = audio_items(req.args)
            cascade = any(isinstance(a, dict) and a.get("transcribe") is not None for a in audio)
            allowed = (len(audio),) if self._chat_applied and not cascade else (0, len(audio))
            if audio and req.args[0].count(AUDIO_MARKER) not in allowed:
                self.planner.place_audio(req.args[0], len(audio))  # raises the clear error
            keys = [key_of[id(a)] if id(a) in key_of else key_of.setdefault(id(a), audio_key(a)) for a in audio]
            items.update(zip(keys, audio))
            per_request.append(keys)
        return items, per_request, self.planner.resolve(items)

    def _warn_if_instruct_without_chat_template(self) -> None:
        """A chat checkpoint (one that ships a chat template, or is named instruct) run on raw prompts: its
        authors prompt it through the template. Not for the embedded model, trained on raw prompts."""
        from lmeval_speech.mini.modeling import MODEL_TYPE

        if self._chat_applied or self._chat_warned or self.pretrained in ("mini", "mini-base") \
                or self.identity.get("model_type") == MODEL_TYPE:
            return
        try:
            ships = bool(getattr(self.tokenizer, "chat_template", None))
        except (NotImplementedError, AttributeError, TypeError, ValueError):  # no template text (mistral-common): a chat tokenizer
            ships = True
        if not ships and "instruct" not in self.pretrained.lower():
            return
        self._chat_warned = True
        log.warning("%s is a chat checkpoint (it ships a chat template) evaluated without it; its authors prompt "
                    "it through the template: add --apply_chat_template (the gap may otherwise be a prompting "
                    "artefact)", self.pretrained)

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
                seqs.append(self.planner.build(i, req.args[0], req.args[1], keys, req, want_span))
            except AudioRequestError as err:  # e.g. the audio does not fit max_length: this item only
                if self.fail_fast or not keys:
                    raise
                out[i] = outcomes.failed(f"AudioRequestError: {err}")
                continue
            if seqs[-1].cut:
                truncated = self._with_cut(truncated, seqs[-1].cut, len(seqs[-1].tokens) + seqs[-1].cut + 1)
            transcript = " | ".join(status[k].transcript for k in keys if status[k].transcript is not None)
            if truncated or transcript:
                marks[i] = (truncated, transcript)
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

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for req in tqdm(requests, desc="Running loglikelihood_rolling requests", disable=disable_tqdm or self.rank != 0):
            if audio_items(req.args):
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
        """Batched greedy/sampled generation: requests with the same generation kwargs are batched
        (lm-eval's ``Collator``, longest first), left-padded, and every row stops at its stop
        strings during generation (lm-eval's stopping criteria); each audio is encoded once."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        if self.intervener is not None and requests:
            # generation installs no hooks: its answers would be the unedited model's, recorded as intervened
            raise ValueError(f"intervention={self.intervener.spec.kind} applies to log-likelihood scoring only; "
                             f"{requests[0].task_name} is a generation task: run it without intervention=")
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        items, per_request, status = self._plan(requests)
        out: list = [None] * len(requests)
        todo = []
        for i, (req, keys) in enumerate(zip(requests, per_request, strict=True)):
            failed, truncated = self._outcome(keys, status)
            if failed:  # an empty generation marked as failed, never an answer
                out[i] = outcomes.ScoredText("", failed=failed)
                continue
            context, transcript = req.args[0], ""
            heard = [k for k in keys if status[k].transcript is not None]
            if heard:  # cascade twin: each marker becomes its transcript, and the prompt is text only
                if len(heard) != len(keys) or context.count(AUDIO_MARKER) != len(keys):
                    if self.fail_fast:
                        raise AudioRequestError("a cascade prompt needs one <audio> marker per transcribed audio")
                    out[i] = outcomes.ScoredText("", failed="AudioRequestError: a cascade prompt needs one "
                                                 "<audio> marker per transcribed audio")
                    continue
                for k in keys:
                    context = context.replace(AUDIO_MARKER, status[k].transcript, 1)
                transcript, keys = " | ".join(status[k].transcript for k in heard), []
            todo.append((i, req, keys, truncated, context, transcript))
        pbar = tqdm(total=len(todo), desc="Running generate_until requests", disable=disable_tqdm or self.rank != 0)
        # batches share generation kwargs and modality (a modality-dependent model, e.g. Granite's
        # speech LoRA, is switched per batch)
        collator = Collator([(i, context, req.args[1], bool(keys)) for i, req, keys, _, context, _ in todo],
                            sort_fn=lambda x: (-len(x[1]), x[1]), group_by="gen_kwargs",
                            group_fn=lambda x: (json.dumps(x[2], sort_keys=True, default=str), x[3]))
        info = {i: (req, keys, (truncated, transcript)) for i, req, keys, truncated, _, transcript in todo}
        for chunk in collator.get_batched(n=max(1, self.batch_size), batch_fn=None):
            kwargs = normalize_gen_kwargs(dict(chunk[0][2]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)
            seqs = []
            for index, context, _, _ in chunk:
                req, keys, _ = info[index]
                try:
                    if keys:
                        context = self.planner.place_audio(context, len(keys))
                    tokens, spans = self.planner.expand(self.tok_encode(context), keys)
                    cut = max(0, len(tokens) - (self.max_length - max_new))
                    if cut and spans and spans[0][0] < cut:
                        raise AudioRequestError(f"prompt of {len(tokens)} tokens leaves no room for the audio "
                                                "within max_length")
                except AudioRequestError as err:  # this item only, as in loglikelihood
                    if self.fail_fast or not keys:
                        raise
                    out[index] = outcomes.ScoredText("", failed=f"AudioRequestError: {err}")
                    pbar.update(1)
                    continue
                if cut:
                    truncated, transcript = info[index][2]
                    info[index] = (req, keys, (self._with_cut(truncated, cut, len(tokens)), transcript))
                seqs.append(Seq(index, tokens[cut:], [], [(s - cut, k, n) for s, k, n in spans]))
            if not seqs:
                continue
            embeds, mask, ids = self._left_padded(seqs, items)
            self._set_modality(seqs)
            stopping = stop_sequences_criteria(self.tokenizer, until, 0, len(seqs))
            if self.backend_impl.generate_needs_ids:
                kwargs["prompt_ids"] = ids
            gen = self.backend_impl.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new, pad_token_id=self._pad_id,
                stopping_criteria=stopping, **kwargs)
            for row, s in enumerate(seqs):
                req, _, (truncated, transcript) = info[s.index]
                text = postprocess_generated_text(self.tok_decode(gen[row].tolist()), stop=until, think_end_token=None)
                if truncated or transcript:
                    text = outcomes.ScoredText(text, truncated=truncated, transcript=transcript)
                out[s.index] = text
                self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
            pbar.update(len(seqs))
        pbar.close()
        return out
