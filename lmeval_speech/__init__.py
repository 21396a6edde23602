"""lmeval-speech: the modality gap of speech LLMs, measured with lm-evaluation-harness."""

__version__ = "0.1.0"

# Where a speech request's audio goes inside its text prompt. A backend swaps it for its own
# placeholder (e.g. Qwen2-Audio's <|audio_bos|><|AUDIO|><|audio_eos|>); absent, audio goes first.
AUDIO_MARKER = "<audio>"
