"""The ``lslm`` adapter against independent computations: lm-eval's own ``hf`` model for text,
a direct ``model(**processor(...))`` forward for speech, and itself at another batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from conftest import tone
from lmeval_speech.models.backends import UnsupportedModelError
from lmeval_speech.models.lslm import LSLM

TEXT_PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Rome"),
    ("The following are questions (with answers) about geography.\n\nQuestion: Which river", " is the longest"),
    ("the quick brown fox", " jumps over the lazy dog"),
    ("A. Paris B. Rome C. Madrid D. Berlin Answer: ", "A"),
    ("", "the quick brown fox"),
]


def req(*args, kind="loglikelihood"):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_text_loglikelihood_matches_lm_eval_hf(tiny_llama_dir):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=tiny_llama_dir, device="cpu", dtype="float32", batch_size=4)
    ours = LSLM(pretrained=tiny_llama_dir, device="cpu", batch_size=4)
    expected = hf.loglikelihood([req(c, x) for c, x in TEXT_PAIRS])
    got = ours.loglikelihood([req(c, x) for c, x in TEXT_PAIRS])
    for (e_ll, e_g), (g_ll, g_g) in zip(expected, got, strict=True):
        assert abs(e_ll - g_ll) < 1e-4
        assert e_g == g_g
    assert len({round(ll, 3) for ll, _ in got}) == len(got)  # not a constant


FAMILY_LOGIT_TRANSFORMS = {  # transformers class names, the config field that transforms the LM head's output
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 2.0, "head_dim": 16}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
}


def _tiny_family(tmp_path, tokenizer, family):
    import transformers

    cfg_name, model_name, extra = FAMILY_LOGIT_TRANSFORMS[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    path = tmp_path / family
    getattr(transformers, model_name)(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", sorted(FAMILY_LOGIT_TRANSFORMS))
def test_text_families_that_transform_their_logits_match_lm_eval_hf(tmp_path, tokenizer, family):
    """Found by a review: the text path took ``lm_head``'s output as the logits, but Granite divides it
    by ``logits_scaling``, Gemma 2 soft-caps it and Cohere scales it (tiny Granite: -149.0 vs lm-eval's
    -10.0). Granite 3.x is granite-speech's natural text baseline."""
    from lm_eval.models.huggingface import HFLM

    path = _tiny_family(tmp_path, tokenizer, family)
    reqs = [req(c, x) for c, x in TEXT_PAIRS[:4]]
    expected = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=2).loglikelihood(reqs)
    for prefix_cache in (True, False):
        got = LSLM(pretrained=path, device="cpu", batch_size=2, prefix_cache=prefix_cache).loglikelihood(reqs)
        for (e_ll, e_g), (g_ll, g_g) in zip(expected, got, strict=True):
            assert abs(e_ll - g_ll) < 1e-4 and e_g == g_g, (family, prefix_cache, e_ll, g_ll)


def test_a_family_whose_logit_transform_is_unknown_stops_at_load(tmp_path, tokenizer, monkeypatch):
    from lmeval_speech.models.backends import causal_lm

    path = _tiny_family(tmp_path, tokenizer, "granite")
    monkeypatch.setattr(causal_lm, "final_logits", lambda config, logits: logits)  # as if Granite were unknown
    with pytest.raises(ValueError, match="does not reproduce GraniteForCausalLM's own logits"):
        LSLM(pretrained=path, device="cpu")


def test_sliding_window_scores_do_not_depend_on_the_batch(tmp_path, tokenizer, tiny_llama_dir):
    """Found by a review: with the prefix cache, a continuation sits at cache index (widest prefix of the
    batch) + j, and Mistral's sliding-window mask counts cache indices: a short prefix batched with a long
    one lost tokens inside its real window (-554.36 at batch 2 against lm-eval's -555.80)."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     sliding_window=6, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = str(tmp_path / "mistral_sw")
    transformers.MistralForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    reqs = [req("Question: What is the capital of France?\nAnswer:", " Paris is the capital"),
            req("the quick", " brown fox jumps over the lazy dog")]
    expected = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=1).loglikelihood(reqs)
    lm = LSLM(pretrained=path, device="cpu", batch_size=2)
    got = lm.loglikelihood(reqs)
    for (e_ll, _), (g_ll, _) in zip(expected, got, strict=True):
        assert abs(e_ll - g_ll) < 1e-3, (e_ll, g_ll)
    assert not lm.prefix_cache
    # a window as wide as max_length still drops tokens (a continuation sits up to 2 x max_length cache
    # slots from its prefix's start): -120.372 against -120.455
    cfg.sliding_window = 24
    transformers.MistralForCausalLM(cfg).save_pretrained(path)
    expected = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=1, max_length=24).loglikelihood(reqs)
    got = LSLM(pretrained=path, device="cpu", batch_size=2, max_length=24).loglikelihood(reqs)
    for (e_ll, _), (g_ll, _) in zip(expected, got, strict=True):
        assert abs(e_ll - g_ll) < 1e-3, (e_ll, g_ll)
    # a window wider than any sequence (Phi-3/4 carry 262,144) changes nothing: the prefix cache stays on
    cfg.sliding_window = 10**6
    transformers.MistralForCausalLM(cfg).save_pretrained(path)
    assert LSLM(pretrained=path, device="cpu").prefix_cache
    assert LSLM(pretrained=tiny_llama_dir, device="cpu").prefix_cache  # no window at all


def test_generation_refuses_an_intervention_it_would_not_apply(tiny_qwen2_audio_dir):
    """Generation installs no intervention hooks: its answers were the unedited model's, recorded as intervened."""
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="angle", intervene_layers="1")
    with pytest.raises(ValueError, match="log-likelihood scoring only"):
        lm.generate_until([req("Question: 2 + 2 =", {"until": ["\n"], "max_gen_toks": 3}, kind="generate_until")])


def test_text_rolling_matches_lm_eval_hf(tiny_llama_dir):
    from lm_eval.models.huggingface import HFLM

    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
    hf = HFLM(pretrained=tiny_llama_dir, device="cpu", dtype="float32", batch_size=2, max_length=64)
    ours = LSLM(pretrained=tiny_llama_dir, device="cpu", batch_size=2, max_length=64)
    kind = "loglikelihood_rolling"
    (e,), (g,) = hf.loglikelihood_rolling([req(text, kind=kind)]), ours.loglikelihood_rolling([req(text, kind=kind)])
    assert abs(e - g) < 1e-3 and e < 0


def speech_requests(seconds=(1.0, 2.3, 0.7)):
    reqs = []
    for i, s in enumerate(seconds):
        audio = {"audio": [{"array": tone(s, 200 + 60 * i, seed=i), "sampling_rate": 16000}]}
        for choice in [" Paris", " Rome", " Madrid and more"]:
            reqs.append(req("Question: <audio>\nAnswer:", choice, audio))
    return reqs


def test_speech_loglikelihood_matches_direct_processor_forward(tiny_qwen2_audio_dir):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    ours = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3)
    reqs = speech_requests()
    got = ours.loglikelihood(reqs)

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(tiny_qwen2_audio_dir)
    placeholder = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    for r, (ll, _) in zip(reqs, got, strict=True):
        ctx, cont, extra = r.args
        audio = extra["audio"][0]["array"]
        prompt = ctx.replace("<audio>", placeholder)
        full = proc(text=prompt + cont, audio=[audio], sampling_rate=16000, return_tensors="pt")
        n_ctx = proc(text=prompt, audio=[audio], sampling_rate=16000, return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**full).logits[0].float()
        ids = full["input_ids"][0]
        logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
        direct = float(logp[n_ctx - 1 :].sum())
        assert abs(direct - ll) < 1e-4, (cont, direct, ll)


def test_speech_batch_size_does_not_change_results(tiny_qwen2_audio_dir):
    reqs = speech_requests()
    one = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=1).loglikelihood(reqs)
    eight = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=8).loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in one], [x for x, _ in eight], atol=1e-4)


def test_audio_is_encoded_once_per_item(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=2)
    calls = []
    real = lm.backend_impl.encode_audio
    lm.backend_impl.encode_audio = lambda arrays: calls.append(len(arrays)) or real(arrays)
    lm.loglikelihood(speech_requests())
    assert sum(calls) == 3  # 3 items x 3 choices -> 3 clips encoded


def test_audio_changes_the_score(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    a, b = speech_requests(seconds=(1.0,))[0], speech_requests(seconds=(1.5,))[0]
    assert abs(lm.loglikelihood([a])[0][0] - lm.loglikelihood([b])[0][0]) > 1e-6


def test_marker_count_mismatch_is_a_clear_error(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    audio = {"audio": [{"array": tone(1.0), "sampling_rate": 16000}]}
    with pytest.raises(ValueError, match="2 <audio> markers but the request carries 1"):
        lm.loglikelihood([req("<audio> and <audio>", " x", audio)])


def test_bad_audio_item_is_skipped_not_fatal(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    bad = {"audio": [{"array": np.array([np.nan] * 1600, dtype=np.float32), "sampling_rate": 16000}]}
    good = speech_requests(seconds=(1.0,))[0]
    res = lm.loglikelihood([req("Q: <audio>\nA:", " x", bad), good])
    assert np.isnan(res[0][0]) and res[0][1] is False and "non-finite" in res[0][0].failed
    assert np.isfinite(res[1][0]) and not getattr(res[1][0], "failed", "")
    assert any("error" in v for v in lm.audio_log.values())
    with pytest.raises(Exception, match="(?i)nan"):
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", fail_fast=True).loglikelihood([req("<audio>", " x", bad)])


def test_an_empty_choice_is_an_error_not_the_best_score(tiny_llama_dir):
    """A choice "" (with ``target_delimiter: ""``) encodes to no token: it scored log p = 0.0, which
    beats every real choice under acc (and NaN under acc_norm, which argmax also picks)."""
    lm = LSLM(pretrained=tiny_llama_dir, device="cpu")
    with pytest.raises(ValueError, match="encodes to no token"):
        lm.loglikelihood([req("Question: 2 + 2 =", " 4"), req("Question: 2 + 2 =", "")])


def test_a_prompt_cut_to_fit_max_length_is_marked_truncated(tiny_llama_dir):
    """A text twin longer than ``max_length`` was cut from the left and scored as if whole, paired with
    a speech twin that heard the whole question; only audio cuts were marked. Now both scoring paths
    mark it, as a cut audio is (the report leaves such pairs out and counts them)."""
    from lmeval_speech import outcomes

    lm = LSLM(pretrained=tiny_llama_dir, device="cpu", max_length=24)
    long_q = "Question: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 6) + "\nAnswer:"
    short, cut = lm.loglikelihood([req("Question: 2 + 2 =", " 4"), req(long_q, " yes")])
    assert not isinstance(short[0], outcomes.Scored) or not short[0].truncated
    total = len(lm.tok_encode(long_q + " yes"))
    assert isinstance(cut[0], outcomes.Scored)
    assert cut[0].truncated == f"prompt cut: its first {total - 25} of {total} tokens dropped to fit max_length=24"
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    short, cut = lm.generate_until([req("Question: 2 + 2 =", gen_kwargs, kind="generate_until"),
                                    req(long_q, gen_kwargs, kind="generate_until")])
    assert not getattr(short, "truncated", "")
    total = len(lm.tok_encode(long_q))
    assert isinstance(cut, outcomes.ScoredText)
    assert cut.truncated == f"prompt cut: its first {total - (24 - 4)} of {total} tokens dropped to fit max_length=24"


def test_a_prompt_whose_text_holds_the_audio_placeholder_fails_its_item(tiny_qwen2_audio_dir):
    """A question or description containing the model's placeholder text (``<|AUDIO|>`` for
    Qwen2-Audio) before the ``<audio>`` marker: the first placeholder took the audio, so it was spliced
    at the wrong place and the real one was left as a raw token. The item fails (counted)."""
    from lmeval_speech import outcomes

    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    audio = {"audio": [{"array": tone(1.0, 300, seed=1), "sampling_rate": 16000}]}
    ok, bad = lm.loglikelihood([req("Question: <audio>\nAnswer:", " Paris", audio),
                                req("See <|AUDIO|> here. Question: <audio>\nAnswer:", " Paris", audio)])
    assert not getattr(ok[0], "failed", "")
    assert isinstance(bad[0], outcomes.Scored) and "audio placeholder" in bad[0].failed
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 3, "do_sample": False}
    ok, bad = lm.generate_until([req("Question: <audio>\nAnswer:", gen_kwargs, audio, kind="generate_until"),
                                 req("See <|AUDIO|> here. Question: <audio>\nAnswer:", gen_kwargs, audio,
                                     kind="generate_until")])  # the run goes on; that item fails
    assert not getattr(ok, "failed", "")
    assert isinstance(bad, outcomes.ScoredText) and bad == "" and "audio placeholder" in bad.failed


def test_text_model_refuses_audio(tiny_llama_dir):
    lm = LSLM(pretrained=tiny_llama_dir, device="cpu")
    with pytest.raises(ValueError, match="takes no audio"):
        lm.loglikelihood(speech_requests(seconds=(0.5,))[:1])


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import Wav2Vec2Config  # a speech model, but not a speech LLM

    Wav2Vec2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="qwen2_audio.*voxtral"):
        LSLM(pretrained=str(tmp_path), device="cpu")


def test_unknown_model_arg_is_an_error(tiny_llama_dir):
    with pytest.raises(TypeError, match="capturee"):
        LSLM(pretrained=tiny_llama_dir, capturee=1)


def test_generate_until_with_audio(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    audio = {"audio": [{"array": tone(1.0), "sampling_rate": 16000}]}
    out = lm.generate_until([req("Question: <audio>\nAnswer:", {"until": ["\n"], "max_gen_toks": 5,
                                                                "do_sample": False}, audio, kind="generate_until")])
    # not a failed item (a failure is an empty string marked failed), and the stop string cuts the same
    # greedy decode where it first appears (test_trust checks the decode against transformers' generate)
    assert not getattr(out[0], "failed", "") and "\n" not in out[0]
    free = lm.generate_until([req("Question: <audio>\nAnswer:", {"until": ["<never>"], "max_gen_toks": 5,
                                                                 "do_sample": False}, audio, kind="generate_until")])
    assert not getattr(free[0], "failed", "") and free[0].split("\n")[0] == out[0]


def test_bad_and_odd_audio_inputs_are_fixed_or_reported(tiny_qwen2_audio_dir, tmp_path):
    """Each odd input is either fixed (and the fix recorded) or reported per item; none ends the run."""
    garbage = tmp_path / "clip.wav"
    garbage.write_bytes(b"not a wav file at all")
    sr = 44100
    stereo = np.stack([tone(1.0, sr=sr), tone(1.0, sr=sr, seed=1)], axis=1)
    cases = {
        "tiny": {"array": tone(0.01), "sampling_rate": 16000},
        "ten_minutes": {"array": np.tile(tone(1.0), 600), "sampling_rate": 16000},
        "stereo_44k": {"array": stereo, "sampling_rate": sr},
        "empty": {"array": np.zeros(0, dtype=np.float32), "sampling_rate": 16000},
        "inf": {"array": np.full(1600, np.inf, dtype=np.float32), "sampling_rate": 16000},
        "unreadable_file": {"path": str(garbage)},
    }
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=4, max_audio_seconds=30)
    res = lm.loglikelihood([req("Q: <audio>\nA:", " x", {"audio": [a]}) for a in cases.values()])
    got = dict(zip(cases, res))
    for ok in ("tiny", "ten_minutes", "stereo_44k"):
        assert np.isfinite(got[ok][0]), ok
    for bad in ("empty", "inf", "unreadable_file"):
        assert np.isnan(got[bad][0]) and got[bad][0].failed and got[bad][1] is False, bad
    assert got["ten_minutes"][0].truncated.startswith("truncated 600.0s -> 30.0s")
    notes = list(lm.audio_log.values())
    fixes = " ".join(f for n in notes for f in n.get("fixes", []))
    assert "truncated" in fixes and "downmixed" in fixes and "resampled" in fixes
    errors = " ".join(n["error"] for n in notes if "error" in n)
    assert str(garbage) in errors and "empty" in errors.lower()


def test_one_token_choices_share_one_forward(tiny_llama_dir):
    from lm_eval.models.huggingface import HFLM

    ctx = "A. Paris B. Rome C. Madrid D. Berlin Answer:"
    reqs = [req(ctx, f" {c}") for c in "ABCD"]
    lm = LSLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)
    calls = []
    real = lm.backend_impl.run_decoder
    lm.backend_impl.run_decoder = lambda *a, **k: calls.append(1) or real(*a, **k)
    got = lm.loglikelihood(reqs)
    expected = HFLM(pretrained=tiny_llama_dir, device="cpu", dtype="float32", batch_size=1).loglikelihood(reqs)
    assert len(calls) == 1
    np.testing.assert_allclose([g for g, _ in got], [e for e, _ in expected], atol=1e-4)


def test_audio_that_does_not_fit_max_length_fails_its_item_only(tiny_qwen2_audio_dir):
    """Ten minutes for Qwen2-Audio are cut to its 300 s (7,500 positions): past max_length=2048 that
    item is not scored (and says why); the other item is."""
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", max_length=2048)
    res = lm.loglikelihood([req("Q: <audio>\nA:", " x", {"audio": [{"array": np.tile(tone(1.0), 600),
                                                                    "sampling_rate": 16000}]}),
                            speech_requests(seconds=(1.0,))[0]])
    assert np.isnan(res[0][0]) and "max_length=2048" in res[0][0].failed and np.isfinite(res[1][0])


def test_batched_generation_equals_batch_1_token_for_token(tiny_qwen2_audio_dir):
    """Left-padded batches of different lengths (speech and text) give the batch-1 outputs exactly,
    and each row stops at its own stop string."""
    kw = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    kw2 = {"until": ["e"], "max_gen_toks": 6, "do_sample": False}
    reqs = [req("Question: <audio>\nAnswer:", kw, {"audio": [{"array": tone(s, seed=i), "sampling_rate": 16000}]},
                kind="generate_until") for i, s in enumerate((0.6, 1.7, 1.1))]
    reqs += [req(t, k, kind="generate_until") for t, k in (("The following are questions", kw), ("the quick", kw2),
                                                           ("Question: What is the capital of France?\nAnswer:", kw))]
    one = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=1).generate_until(reqs)
    batched = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=4).generate_until(reqs)
    assert batched == one and any(len(t) > 0 for t in one)
    assert "\n" not in "".join(one[:3]) and "e" not in one[4]


@pytest.fixture(scope="module")
def tiny_qwen2_audio_chat_dir(tmp_path_factory, tokenizer):
    """The tiny Qwen2-Audio with its processor's real chat template (transformers' Qwen2-Audio one)."""
    from transformers import AutoProcessor, Qwen2AudioProcessor

    from conftest import save_tiny_qwen2_audio

    path = save_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio_chat"), tokenizer)
    proc = AutoProcessor.from_pretrained(path)
    proc.chat_template = Qwen2AudioProcessor.default_chat_template.fget(proc)
    proc.save_pretrained(path)
    return path


def test_chat_template_is_the_processors_with_audio_content_and_its_own_system_prompt(tiny_qwen2_audio_chat_dir):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_qwen2_audio_chat_dir)
    lm = LSLM(pretrained=tiny_qwen2_audio_chat_dir, device="cpu")
    desc = "The following are questions (with answers) about geography."
    speech = lm.apply_chat_template([{"role": "system", "content": desc},
                                     {"role": "user", "content": "Question: <audio>\nAnswer:"}])
    expected = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": f"{desc}\n\nQuestion: "}, {"type": "audio"},
                                      {"type": "text", "text": "\nAnswer:"}]}], tokenize=False, add_generation_prompt=True)
    placeholder = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    assert speech == expected.replace(placeholder, "<audio>")
    assert "You are a helpful assistant." in speech and "Audio 1: <audio>" in speech  # the model's own wrapper
    text = lm.apply_chat_template([{"role": "system", "content": desc},
                                   {"role": "user", "content": "Question: Which river is longest?\nAnswer:"}])
    assert text == speech.replace("Audio 1: <audio>\n", "Which river is longest?")  # same wrapper, text inside
    assert lm.chat_template(True) == proc.chat_template
    # and the rendered speech prompt scores like the real processor + model on the same string
    audio = tone(1.2, seed=5)
    (ll, _), = lm.loglikelihood([req(speech, "Paris", {"audio": [{"array": audio, "sampling_rate": 16000}]})])
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio_chat_dir, dtype=torch.float32).eval()
    prompt = speech.replace("<audio>", placeholder)
    full = proc(text=prompt + "Paris", audio=[audio], sampling_rate=16000, return_tensors="pt")
    # lm-eval moves the context's trailing whitespace ("assistant\n") into the continuation
    n_ctx = proc(text=prompt.rstrip(), audio=[audio], sampling_rate=16000, return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**full).logits[0].float()
    ids = full["input_ids"][0]
    direct = float(torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[n_ctx - 1:, 0].sum())
    assert abs(direct - ll) < 1e-4


def test_speech_embedding_cache_smaller_than_a_batch_or_full_never_loses_a_batch_key(tiny_qwen2_audio_dir):
    """Found by a long run (mini, 674 clips, the LRU full after planning): inserting a batch's missing
    audio evicted the batch's own oldest cached key, then reading it raised KeyError."""
    from lmeval_speech.models.runner import SpeechEmbeddings

    class Encoder:
        def encode(self, arrays):
            return [torch.full((2, 3), float(a)) for a in arrays]

    cache = SpeechEmbeddings(Encoder(), size=2)
    cache.get(["a", "b"], lambda k: ord(k))  # full; "a" is the oldest
    got = cache.get(["a", "c"], lambda k: ord(k))  # "a" cached, "c" inserted: "b" must go, not "a"
    assert {k: float(v[0, 0]) for k, v in got.items()} == {"a": ord("a"), "c": ord("c")}
    assert list(cache._lru) == ["a", "c"]
    # through the model: 3 clips in one batch, an LRU of 1
    reqs = speech_requests()
    small = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3, audio_cache_size=1).loglikelihood(reqs)
    big = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3).loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in small], [x for x, _ in big], atol=1e-6)


def test_a_speech_prompt_without_a_marker_under_a_chat_template_stops(tiny_qwen2_audio_chat_dir):
    """Found by a review: without an <audio> marker the audio is put first, which under a chat template
    is before the template's first turn (``<audio><|im_start|>system...``): a prompt no model is given."""
    lm = LSLM(pretrained=tiny_qwen2_audio_chat_dir, device="cpu")
    prompt = lm.apply_chat_template([{"role": "user", "content": "Which city is this?"}])
    audio = {"audio": [{"array": tone(1.0), "sampling_rate": 16000}]}
    with pytest.raises(ValueError, match="without an <audio> marker"):
        lm.loglikelihood([req(prompt, "Paris", audio)])
    assert not lm.audio.status  # stopped before any audio was prepared
    with pytest.raises(ValueError, match="without an <audio> marker"):
        lm.generate_until([req(prompt, {"until": ["\n"], "max_gen_toks": 2}, audio, kind="generate_until")])
    # with --cache_requests lm-eval never calls apply_chat_template, only chat_template(True) for its record
    cached = LSLM(pretrained=tiny_qwen2_audio_chat_dir, device="cpu")
    cached.chat_template(True)
    with pytest.raises(ValueError, match="without an <audio> marker"):
        cached.loglikelihood([req(prompt, "Paris", audio)])



def test_a_chat_checkpoint_without_its_template_is_warned_about_whatever_its_name(tmp_path, tokenizer, tiny_llama_dir, caplog):
    """Found by a review: the warning looked for "instruct" in the path, missing Qwen2.5-Omni-7B,
    Voxtral-Mini-3B-2507, granite-speech-3.3-8b, gemma-3n-E4B-it: a checkpoint that ships a chat template is one."""
    import logging
    import shutil

    chat, plain = tmp_path / "some-chat-model", tmp_path / "some-base-model"
    shutil.copytree(tiny_llama_dir, chat)  # its tokenizer ships a chat template (tests/conftest.py)
    shutil.copytree(tiny_llama_dir, plain)
    for f in plain.glob("chat_template*"):
        f.unlink()
    tok = type(tokenizer).from_pretrained(plain)
    tok.chat_template = None
    tok.save_pretrained(plain)
    assert not type(tokenizer).from_pretrained(plain).chat_template
    reqs = [req("Question: 2 + 2 =", " 4")]
    with caplog.at_level(logging.WARNING, logger="lmeval_speech.models.lslm"):
        LSLM(pretrained=str(chat), device="cpu").loglikelihood(reqs)
    assert "evaluated without it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmeval_speech.models.lslm"):
        LSLM(pretrained=str(plain), device="cpu").loglikelihood(reqs)  # no template shipped: no warning
    assert "evaluated without it" not in caplog.text
