"""Owns ``lslm``'s side of the run record: the model's identity, the run conditions a capture dir or a
``--use_cache`` database must share, and what ``get_model_info`` hands lm-eval for the results JSON (the
manifest's model, settings and hooks); a mixin of ``LSLM``."""

from __future__ import annotations

import json

from lmeval_speech.audio.spoken_form import VERSION as SPOKEN_FORM_VERSION
from lmeval_speech.capture.store import mismatch
from lmeval_speech.conditions import check_listed


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


class RunRecord:
    def conditions(self) -> dict:
        """The values of the run conditions (their list, and which guard compares each, is
        ``lmeval_speech/conditions.py``): a capture dir or ``--use_cache`` database made under other
        conditions is refused."""
        intervention = None
        if self.intervener is not None:  # where its calibration is saved changes no number
            intervention = {k: v for k, v in self.intervener.spec.to_dict().items() if k != "save_calibration"}
        a = self.audio_settings
        conditions = {"tts_override": a.tts_override or None,
                      "noise": None if a.noise is None else a.noise.to_dict(),
                      "intervention": intervention,
                      "audio_overflow": a.audio_overflow, "max_audio_seconds": a.max_audio_seconds,
                      "max_length": self.max_length, "add_bos_token": self.add_bos_token,
                      "prefix_token_id": self.custom_prefix_token_id,
                      "spoken_form": SPOKEN_FORM_VERSION}  # how TTS texts are rewritten before synthesis
        return check_listed(json.loads(json.dumps(conditions)))  # as stored (JSON), so a reread compares equal

    @property
    def audio_log(self) -> dict[str, dict]:
        """Audio key -> what was done to it (fix-ups, truncation) or why it was not scored."""
        return {k: ({"error": st.error} if st.error else st.notes) for k, st in self.audio.status.items()}

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
            "settings": {**self.audio_settings.to_record(),
                         "max_length": self.max_length, "batch_size": self.batch_size,
                         "spoken_form": SPOKEN_FORM_VERSION},
            "conditions": self.conditions(),  # the one record every guard compares (lmeval_speech/conditions.py)
            "hooks": {"capture": None if self.capture is None else self.capture.spec(),
                      "intervention": None if self.intervener is None else self._intervention_manifest()},
        }}

    def _intervention_manifest(self) -> dict:
        iv, n = self.intervener, len(self.backend_impl.decoder_layers)
        hooks = {"edit": iv.hook_spec("edit").to_dict(n)}
        if iv.spec.mode == "oracle":
            hooks["read"] = iv.hook_spec("read").to_dict(n)
        return {**iv.spec.to_dict(), "hooks": hooks}
