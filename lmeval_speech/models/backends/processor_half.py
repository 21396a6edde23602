"""Owns loading a checkpoint's processor for its audio path: the whole processor where it can be built, else its
audio half (the same processor class, without the image and video processors that need torchvision).

Several multimodal processors (Gemma 4, Phi-4-multimodal, the Omni models) hold an image or a video processor whose
class needs ``torchvision``; the PyPI ``torchvision`` wheel pinned to the CPU torch this package is developed with
fails on import (``operator torchvision::nms does not exist``). Their audio path never touches those halves, so the
processor class itself is built with ``None`` in their place: its own ``__init__`` (tokens, audio settings from
``processor_config.json``), its own ``__call__`` on text + audio, its own audio-token rule and its own chat template
rendered by transformers' renderer. Nothing of the audio path is rewritten here. Where ``torchvision`` imports (a
GPU user's machine) the whole processor is loaded with ``AutoProcessor``.
"""

from __future__ import annotations

VISION_HALVES = ("image_processor", "video_processor")


def audio_half_class(processor_cls):
    """``processor_cls`` accepting ``None`` for its image and video processors (only these: every other argument is
    checked as the class checks it)."""

    class AudioHalf(processor_cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name in VISION_HALVES:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    AudioHalf.__name__ = AudioHalf.__qualname__ = f"{processor_cls.__name__}AudioHalf"
    return AudioHalf


def load_processor(processor_cls, path, *, revision=None, trust_remote_code=False, full: bool | None = None):
    """The checkpoint's processor: ``AutoProcessor`` where torchvision imports (``full=None``) or ``full=True``;
    else ``processor_cls``'s audio half, built from the checkpoint's ``processor_config.json`` (its own settings and
    chat template), its feature extractor and its tokenizer."""
    import inspect

    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    kw = dict(revision=revision, trust_remote_code=trust_remote_code)
    if full or (full is None and is_torchvision_available()):
        return AutoProcessor.from_pretrained(path, **kw)
    settings, _ = processor_cls.get_processor_dict(path, revision=revision)
    init = inspect.signature(processor_cls.__init__).parameters
    halves = processor_cls.get_attributes()  # tokenizer, the audio processor (under its own name), image/video ones
    parts = {name: None if name in VISION_HALVES else AutoTokenizer.from_pretrained(path, **kw) if name == "tokenizer"
             else AutoFeatureExtractor.from_pretrained(path, **kw) for name in halves}
    # its own settings; the chat template also where ``__init__`` takes it through ``**kwargs`` (Phi-4's processor)
    own = {k: v for k, v in settings.items() if (k in init or k == "chat_template") and k not in halves}
    return audio_half_class(processor_cls)(**parts, **own)
