"""Owns rendering lm-eval's chat history for ``--apply_chat_template`` the way each model's authors do.

* The template is the *processor's* when the model has one (``Qwen2AudioProcessor`` ...), else the
  tokenizer's; a processor template gets structured content: each ``<audio>`` marker becomes an
  ``{"type": "audio"}`` item between ``{"type": "text"}`` items, as transformers' processors expect.
  The text twin goes through the same template with the same wrapper around its question.
* lm-eval sends the task description (and any ``--system_instruction``) as a system turn. It is
  folded into the start of the first user turn, so every model keeps its own system prompt: the one
  its model card's examples use where the backend knows it (``Backend.card_system_prompt``: Qwen2.5-Omni's
  "You are Qwen, a virtual human ...", Granite Speech's fixed-date Granite prompt, whose template default
  would write the day of the run), else its template's default (Qwen2-Audio's "You are a helpful
  assistant."); models without system prompts (Voxtral's card) get none. ``system_prompt=template``
  (a model arg) keeps the template's default everywhere.
* What the template renders for an audio (``Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>``) keeps the
  model's own text around it; its placeholder is turned back into the ``<audio>`` marker, so the rest
  of the pipeline (one placeholder per audio, expanded to the encoder's length) is unchanged.
"""

from __future__ import annotations

import logging

from lmeval_speech import AUDIO_MARKER

log = logging.getLogger("lmeval_speech.models.lslm")


def fold_system(messages: list[dict]) -> list[dict]:
    """Merge system turns into the first user turn (description first, a blank line, then the turn)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = "\n\n".join(s.strip() for s in system if s) + "\n\n" + rest[0]["content"] \
            if any(s.strip() for s in system) else rest[0]["content"]
    elif system:
        rest.insert(0, {"role": "user", "content": "\n\n".join(system)})
    return rest


def structured(content: str) -> list[dict]:
    """``"Question: <audio>\\nAnswer:"`` -> text, audio, text items (empty texts dropped)."""
    parts = content.split(AUDIO_MARKER)
    out = []
    for i, text in enumerate(parts):
        if text:
            out.append({"type": "text", "text": text})
        if i < len(parts) - 1:
            out.append({"type": "audio"})
    return out


def template_owner(backend):
    """The processor when it carries a chat template (it renders audio), else the tokenizer."""
    processor = getattr(backend, "processor", None)
    if processor is not None and getattr(processor, "chat_template", None):
        return processor
    return backend.tokenizer


def render(backend, chat_history: list[dict], add_generation_prompt: bool = True, system: str | None = None) -> str:
    """The chat as the model's template renders it; ``system``: a system turn to put first (the model
    card's own, ``Backend.card_system_prompt``), else the template's default."""
    owner = template_owner(backend)
    messages = fold_system(chat_history)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    n_audio = sum(m["content"].count(AUDIO_MARKER) for m in messages if isinstance(m["content"], str))
    if owner is not backend.tokenizer:
        messages = [{"role": m["role"], "content": structured(m["content"])} for m in messages]
    text = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                     continue_final_message=not add_generation_prompt)
    if owner is backend.tokenizer:
        return text  # the markers are still in the text
    # what the template writes for one audio: the placeholder itself, unless the processor expands a shorter
    # token (Gemma 3n: ``<audio_soft_token>`` -> ``\n\n<start_of_audio>...<end_of_audio>\n\n``)
    placeholder = getattr(backend, "chat_audio_token", None) or backend.audio_placeholder
    if text.count(placeholder) != n_audio:
        raise ValueError(f"the chat template of {type(owner).__name__} rendered {text.count(placeholder)} "
                         f"{placeholder!r} for {n_audio} audios; lslm cannot place the audio")
    return text.replace(placeholder, AUDIO_MARKER)


class ChatPrompts:
    """``lslm``'s chat side of lm-eval's API (a mixin of ``LSLM``): the template text lm-eval records, the
    rendering above, and the warning for a chat checkpoint run on raw prompts."""

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template text lm-eval records (and hashes): the processor's when it has one (see
        ``models/chat.py``), else the tokenizer's default or the one named (``--apply_chat_template NAME``)."""
        if chat_template is False or chat_template is None:
            return None
        # lm-eval asks for the template's text whenever --apply_chat_template is given, also when its requests
        # come from --cache_requests and apply_chat_template itself is never called
        self._chat_applied = True
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
        self._chat_applied = True
        return render(self.backend_impl, chat_history, add_generation_prompt, system=self.system_prompt)

    def _warn_if_instruct_without_chat_template(self) -> None:
        """A chat checkpoint (one that ships a chat template, or is named instruct) run on raw prompts: its
        authors prompt it through the template. Not for the embedded model, trained on raw prompts."""
        if self._chat_applied or self._chat_warned or self.pretrained in ("mini", "mini-base") \
                or getattr(self.backend_impl, "raw_prompts", False):
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

