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

from lmeval_speech import AUDIO_MARKER


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
