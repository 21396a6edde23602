"""Tiny random-weight instances of real ``transformers`` classes, saved to disk and loaded back
through ``pretrained=DIR`` exactly as a user's checkpoint would be. Built once per session."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "The following are questions (with answers) about geography.",
    "Question: Which river is the longest in the world?\nAnswer: The Nile",
    "Question: What is the capital of France?\nAnswer: Paris",
    "A. Paris B. Rome C. Madrid D. Berlin Answer: A",
    "Speech language models answer questions they hear instead of read.",
    "the quick brown fox jumps over the lazy dog 0123456789",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>",
            "[BEGIN_AUDIO]", "[AUDIO]", "<|audio|>", "<|AUDIO_START|>", "<|AUDIO_END|>"]


def build_tokenizer():
    """A byte-level BPE trained here with the ``tokenizers`` library (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def multimodal_tokenizer(names: dict[str, str]):
    """``build_tokenizer()`` with the named multimodal tokens (``{"audio_token": "<|AUDIO|>", ...}``) added where
    missing and exposed as its attributes (``tok.audio_token``, ``tok.audio_token_id``), as a released multimodal
    tokenizer declares them for its processor class; same chat template."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer()
    base.add_tokens([t for t in names.values() if t not in base.get_vocab()], special_tokens=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  extra_special_tokens=dict(names))
    tok.chat_template = base.chat_template
    return tok


#: the multimodal token names of Qwen2.5-Omni's tokenizer, which ``Qwen2_5OmniProcessor`` reads
OMNI_TOKENS = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
               "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
               "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_qwen2_audio(path, tokenizer, hidden: int = 64, layers: int = 2) -> str:
    """A random-weight Qwen2-Audio with its real processor, saved as a user's checkpoint would be."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)

    torch.manual_seed(0)
    cfg = Qwen2AudioConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    Qwen2AudioForConditionalGeneration(cfg).save_pretrained(path)
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen2_audio_dir(tmp_path_factory, tokenizer):
    return save_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny_qwen2_audio"), tokenizer)


def without_vision(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` with ``None`` accepted for any processor part (its image / video halves, which need
    torchvision): the class's own argument check relaxed for this call only. A test's reference processor, built
    from the checkpoint's files without the package's loader (``processor_half``)."""
    real_check = cls.check_argument_for_proper_class
    cls.check_argument_for_proper_class = lambda self, name, arg: None if arg is None else real_check(self, name, arg)
    try:
        return cls(*args, **kwargs)
    finally:
        cls.check_argument_for_proper_class = real_check


def tone(seconds: float, freq: float = 220.0, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic test clip: a tone plus a little noise (speech-free, but real audio)."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def run_results(out):
    """The results JSON of an ``lm_eval --output_path OUT`` run (one model folder, one run)."""
    (path,) = glob.glob(str(out / "*" / "results_*.json"))
    return json.loads(Path(path).read_text())


def run_samples(out, task):
    """{doc_id: sample row} of one task of an ``lm_eval --log_samples`` run."""
    (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    return {r["doc_id"]: r for r in map(json.loads, Path(path).read_text().splitlines())}
