"""Issue 31: every model type of the installed transformers that takes audio and answers in text is either run by
an ``lslm`` backend with parity tests, or listed in README's "Not supported" table with the reason."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: forward arguments that carry audio (features, waveforms, audio-token ids) in transformers' model classes
AUDIO_ARG = re.compile(r"input_features|input_values|audio_input_features|audio_input_ids|input_audio_embeds")
#: auto mappings whose classes answer in text
TEXT_OUT = ("MULTIMODAL_LM", "SEQ_TO_SEQ_CAUSAL_LM", "CAUSAL_LM", "IMAGE_TEXT_TO_TEXT")

#: supported model type -> the tests that hold its backend to the real processor and model (parity, long audio,
#: capture, interventions); each must exist
PARITY = {
    "qwen2_audio": ["test_lslm.py::test_speech_loglikelihood_matches_direct_processor_forward"],
    "qwen2_5_omni": ["test_backends.py::test_full_qwen2_5_omni_checkpoint_loads_its_thinker"],
    "qwen2_5_omni_thinker": ["test_backends.py::test_loglikelihood_matches_direct_forward",
                             "test_backends_fixes.py::test_omni_audio_token_count_is_the_processor_modules",
                             "test_backends_processor_half.py::test_qwen2_5_omni_prompt_and_audio_tokens_are_its_processors"],
    "voxtral": ["test_backends.py::test_loglikelihood_matches_direct_forward"],
    "granite_speech": ["test_backends.py::test_loglikelihood_matches_direct_forward",
                       "test_backends_fixes.py::test_granite_scores_divide_the_installed_class_logits_by_logits_scaling"],
    "granite_speech_plus": ["test_backends_granite_plus.py::test_granite_plus_loglikelihood_matches_the_model",
                            "test_backends_granite_plus.py::test_granite_plus_text_twin_is_the_granite_lm",
                            "test_backends_granite_plus.py::test_granite_plus_captures_speech_and_text_states",
                            "test_backends_granite_plus.py::test_granite_plus_interventions_are_exact_and_local"],
    "audioflamingo3": ["test_backends.py::test_af3_loglikelihood_matches_the_processor_and_model"],
    "gemma3n": ["test_backends.py::test_gemma3n_loglikelihood_matches_the_processor_and_model"],
    "gemma4": ["test_backends_gemma4.py::test_gemma4_loglikelihood_matches_the_processor_and_model",
               "test_backends_gemma4.py::test_gemma4_audio_token_count_is_the_processors",
               "test_backends_gemma4.py::test_gemma4_text_twin_matches_the_model",
               "test_backends_gemma4.py::test_gemma4_captures_speech_and_text_states",
               "test_backends_gemma4.py::test_gemma4_interventions_are_exact_and_local",
               "test_backends_gemma4.py::test_gemma4_45_second_clip_is_cut_at_30_s_as_its_extractor_cuts_and_flagged",
               "test_backends_gemma4.py::test_gemma4_chat_template_and_generation"],
    "qwen3_omni_moe": ["test_backends.py::test_full_qwen3_omni_checkpoint_loads_its_thinker"],
    "qwen3_omni_moe_thinker": ["test_backends.py::test_qwen3_omni_loglikelihood_matches_the_thinker"],
    "phi4_multimodal": ["test_backends.py::test_phi4_speech_uses_the_speech_lora_and_text_the_base_model",
                        "test_backends_processor_half.py::test_phi4_prompt_and_audio_tokens_are_its_processors"],
    "nemotron_h_omni": ["test_backends_nemotron_h_omni.py::test_nemotron_h_omni_loglikelihood_matches_the_processor_and_model",
                        "test_backends_nemotron_h_omni.py::test_nemotron_h_omni_audio_token_count_is_the_processors",
                        "test_backends_nemotron_h_omni.py::test_nemotron_h_omni_has_no_prefix_sharing_and_scores_whole_sequences",
                        "test_backends_nemotron_h_omni.py::test_nemotron_h_omni_text_twin_matches_the_model",
                        "test_backends_nemotron_h_omni.py::test_nemotron_h_omni_captures_speech_and_text_states",
                        "test_backends_nemotron_h_omni.py::test_nemotron_h_omni_interventions_are_exact_and_local",
                        "test_backends_nemotron_h_omni.py::test_nemotron_h_omni_chat_template_is_the_processors",
                        "test_backends_nemotron_h_omni.py::test_nemotron_h_omni_generation_is_the_models"],
    "lmeval_speech_mini": ["test_mini_model.py::test_processor_and_forward_use_the_content_dependent_token_count"],
}


def audio_in_text_out_model_types() -> dict[str, str]:
    """``{model_type: class}`` of the installed transformers: the speech-seq2seq mapping's types, and every type of
    a text-answering mapping (``TEXT_OUT``) whose class's ``forward`` takes an audio argument. A modeling file that
    never names an audio argument is not imported (the check is then the same, only faster)."""
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    found = dict(modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES)
    root = Path(transformers.models.__file__).parent
    for mapping in TEXT_OUT:
        for model_type, names in getattr(modeling_auto, f"MODEL_FOR_{mapping}_MAPPING_NAMES").items():
            folder = root / model_type_to_module_name(model_type)
            sources = [f.read_text() for f in folder.glob("modeling_*.py")] if folder.is_dir() else []
            if model_type in found or not any(AUDIO_ARG.search(s) for s in sources):
                continue
            for name in [names] if isinstance(names, str) else names:
                cls = getattr(transformers, name)
                if any(AUDIO_ARG.fullmatch(p) for p in inspect.signature(cls.forward).parameters):
                    found[model_type] = name
    return found


def readme_not_supported() -> dict[str, str]:
    """``{model_type: reason}`` of README's "Not supported" table."""
    text = README.read_text()
    table = text[text.index("<!-- not-supported:start -->"): text.index("<!-- not-supported:end -->")]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            for t in re.findall(r"`([^`]+)`", cells[0]):
                rows[t] = cells[1]
    return rows


@pytest.fixture(scope="module")
def found():
    return audio_in_text_out_model_types()


def test_the_enumeration_finds_the_known_audio_llms(found):
    """The walk is not empty by accident: the families run today and well-known ASR models are found by it."""
    assert {"qwen2_audio", "qwen2_5_omni_thinker", "voxtral", "granite_speech", "audioflamingo3", "gemma3n",
            "qwen3_omni_moe_thinker", "phi4_multimodal", "nemotron_h_omni", "whisper"} <= set(found)
    assert "llama" not in found and "wav2vec2" not in found  # text only; audio in, CTC out


def test_every_audio_in_text_out_model_type_is_supported_or_listed_with_a_reason(found):
    from lmeval_speech.models.backends import SPEECH_BACKENDS

    listed = readme_not_supported()
    unaccounted = sorted(t for t in found if t not in SPEECH_BACKENDS and not listed.get(t))
    assert not unaccounted, f"audio-in text-out model types neither supported nor in README's table: {unaccounted}"
    assert not set(listed) & set(SPEECH_BACKENDS), "a supported type is listed as not supported"


def test_every_supported_model_type_has_parity_tests():
    from lmeval_speech.models.backends import SPEECH_BACKENDS

    assert set(PARITY) == set(SPEECH_BACKENDS)
    here = Path(__file__).parent
    for model_type, tests in PARITY.items():
        for node in tests:
            file, _, name = node.partition("::")
            assert (here / file).is_file(), (model_type, node)
            if name:
                assert re.search(rf"^def {name}\(", (here / file).read_text(), re.MULTILINE), (model_type, node)
