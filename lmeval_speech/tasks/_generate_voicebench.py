"""Writes the VoiceBench task YAMLs (the paper's five subsets, SD-QA per region, MMSU per domain, the
opt-in generate-then-extract pairs); part of ``tasks/_generate.py``, which runs it."""

from __future__ import annotations

from lmeval_speech.tasks import _generate as _g  # HERE read at call time (a test points it elsewhere)
from lmeval_speech.tasks._generate import (  # the shared writers and settings
    ACC,
    AUDIO_MARKER,
    FLAGS,
    LETTERS,
    MMSU_DOMAINS,
    SDQA_REGIONS,
    VERSION,
    VOICEBENCH_SUITE,
    fn,
    fresh,
    speech_metadata,
    write,
    write_modality_groups,
    write_pair,
    write_templates,
)


def generate_voicebench() -> None:
    """VoiceBench (hlt-lab/voicebench): the dataset's recording for the speech twin, its ``prompt``
    column (the recording's text) for the text twin, ``reference`` as the answer. Multiple-choice
    subsets are scored by loglikelihood of the letter; SD-QA (open answers) by generation."""
    recorded = {"recorded_audio": {"dataset": "hlt-lab/voicebench", "column": "audio"}}
    shared = {"dataset_path": "hlt-lab/voicebench", "process_docs": fn("prompts.voicebench_docs")}
    folder = fresh("speech_voicebench")
    speech_prompt = f"{AUDIO_MARKER}\nAnswer:"
    write_templates(folder, {
        **shared, "output_type": "multiple_choice", "doc_to_choice": LETTERS,
        "doc_to_target": "{{'ABCD'.index(reference.strip())}}", "metric_list": ACC,
        "process_results": fn("prompts.voicebench_results"),
    }, "{{prompt.strip()}}\nAnswer:", speech_prompt, "recorded_audio")

    def mcq_pair(pair: str, subset: str, split: str, alias: str) -> list[str]:
        return write_pair(folder, pair, {"dataset_name": subset, "test_split": split},
                          speech_metadata(pair, speech_prompt, **recorded), alias)

    mmsu = {"text": [], "speech": []}
    for domain in MMSU_DOMAINS:
        text, speech = mcq_pair(f"speech_voicebench_mmsu_{domain}", "mmsu", domain, f"mmsu {domain}")
        mmsu["text"].append(text)
        mmsu["speech"].append(speech)
    write_modality_groups(folder, "speech_voicebench_mmsu", mmsu, ["acc"], "voicebench mmsu")
    mcq_pair("speech_voicebench_openbookqa", "openbookqa", "test", "voicebench openbookqa")

    # Opt-in: the same multiple-choice items scored as VoiceBench scores them, generate-then-extract
    # (``<pair>_gen``). VoiceBench's prompt (main.py): the text twin is the row's ``prompt`` alone, the
    # speech twin the recording alone; greedy; its MCQEvaluator's letter extraction (prompts.py).
    folder = fresh("speech_voicebench_mcq_gen")
    write_templates(folder, {
        **shared, "output_type": "generate_until", "doc_to_target": "{{reference.strip()}}",
        "generation_kwargs": {"until": [], "max_gen_toks": 1024, "do_sample": False},
        "process_results": fn("prompts.voicebench_mcq_gen_results"),
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "extract_fail", "aggregation": "mean", "higher_is_better": False}] + FLAGS,
    }, "{{prompt}}", AUDIO_MARKER, "recorded_audio")

    def gen_pair(pair: str, subset: str, split: str, alias: str) -> list[str]:
        return write_pair(folder, pair, {"dataset_name": subset, "test_split": split},
                          speech_metadata(pair, AUDIO_MARKER, **recorded), alias)

    mmsu_gen = {"text": [], "speech": []}
    for domain in MMSU_DOMAINS:
        text, speech = gen_pair(f"speech_voicebench_mmsu_{domain}_gen", "mmsu", domain, f"mmsu {domain} (gen)")
        mmsu_gen["text"].append(text)
        mmsu_gen["speech"].append(speech)
    write_modality_groups(folder, "speech_voicebench_mmsu_gen", mmsu_gen, ["acc", "extract_fail"],
                          "voicebench mmsu (generate-then-extract)")
    gen_pair("speech_voicebench_openbookqa_gen", "openbookqa", "test", "voicebench openbookqa (gen)")

    # SD-QA, every region VoiceBench ships: one pair per region, ``speech_voicebench_sdqa`` groups them
    # (per-region results are its leaves). ``contains_proxy`` is an offline stand-in for VoiceBench's
    # scorers (PEDANT and a GPT judge), named so that it is never mistaken for them.
    folder = fresh("speech_voicebench_sdqa")
    speech_prompt = f"Question: {AUDIO_MARKER}\nAnswer:"
    write_templates(folder, {
        **shared, "dataset_name": "sd-qa", "output_type": "generate_until",
        "doc_to_target": "reference",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 64, "do_sample": False},
        "process_results": fn("prompts.sdqa_process_results"),
        "metric_list": [{"metric": "contains_proxy", "aggregation": "mean", "higher_is_better": True}] + FLAGS,
    }, "Question: {{prompt.strip()}}\nAnswer:", speech_prompt, "recorded_audio")
    sdqa = {"text": [], "speech": []}
    for region in SDQA_REGIONS:
        pair = f"speech_voicebench_sdqa_{region}"
        text, speech = write_pair(folder, pair, {"test_split": region}, speech_metadata(pair, speech_prompt, **recorded),
                                  f"voicebench sd-qa {region}")
        sdqa["text"].append(text)
        sdqa["speech"].append(speech)
    write_modality_groups(folder, "speech_voicebench_sdqa", sdqa, ["contains_proxy"], "voicebench sd-qa (all regions)")

    # AdvBench (safety): the harmful instruction itself is the whole prompt (VoiceBench sends the text
    # twin the row's ``prompt`` and the speech twin only the recording); scored as VoiceBench scores it.
    folder = fresh("speech_voicebench_advbench")
    write_templates(folder, {
        **shared, "dataset_name": "advbench", "test_split": "test", "output_type": "generate_until",
        "doc_to_target": "", "generation_kwargs": {"until": [], "max_gen_toks": 128, "do_sample": False},
        "process_results": fn("prompts.advbench_process_results"),
        "metric_list": [{"metric": "refusal_rate", "aggregation": "mean", "higher_is_better": True}] + FLAGS,
    }, "{{prompt}}", AUDIO_MARKER, "recorded_audio")
    write_pair(folder, "speech_voicebench_advbench", {}, speech_metadata("speech_voicebench_advbench", AUDIO_MARKER,
                                                                          **recorded), "voicebench advbench")

    # IFEval: like AdvBench, the instruction itself is the whole prompt (text twin: the row's ``prompt``;
    # speech twin: only the recording), scored by lm-eval's own IFEval code (lm_eval/tasks/ifeval:
    # its generation settings and its four metrics), offline (lmeval_speech.nltk_data).
    folder = fresh("speech_voicebench_ifeval")
    inst_agg = fn("prompts.ifeval_inst_level_acc")
    write_templates(folder, {
        **shared, "dataset_name": "ifeval", "test_split": "test", "output_type": "generate_until",
        "process_docs": fn("prompts.voicebench_ifeval_docs"), "doc_to_target": "",
        "generation_kwargs": {"until": [], "max_gen_toks": 1280, "do_sample": False, "temperature": 0.0},
        "process_results": fn("prompts.ifeval_process_results"),
        "metric_list": [{"metric": "prompt_level_strict_acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "inst_level_strict_acc", "aggregation": inst_agg, "higher_is_better": True},
                        {"metric": "prompt_level_loose_acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "inst_level_loose_acc", "aggregation": inst_agg, "higher_is_better": True}] + FLAGS,
    }, "{{prompt}}", AUDIO_MARKER, "recorded_audio")
    write_pair(folder, "speech_voicebench_ifeval", {}, speech_metadata("speech_voicebench_ifeval", AUDIO_MARKER,
                                                                        **recorded), "voicebench ifeval")

    # The suite: the paper's five VoiceBench subsets. No aggregate here (text and speech must not be
    # averaged, and VoiceBench's Overall is not one lm-eval metric): ``lmeval-speech report`` computes
    # the Overall per modality (lmeval_speech.report.voicebench).
    write(_g.HERE / "speech_voicebench", "_speech_voicebench_suite.yaml", {
        "group": "speech_voicebench", "group_alias": "voicebench (paper suite)", "task": VOICEBENCH_SUITE,
        "metadata": {"version": VERSION, "suite": "voicebench"}})
