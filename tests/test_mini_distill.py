"""Stage 2 of the mini adapter's training (distillation through the frozen LLM), on the real model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def distiller():
    from transformers import AutoTokenizer

    from lmeval_speech.mini.build import build_mini
    from lmeval_speech.mini.distill import Distiller
    from lmeval_speech.mini.modeling import MiniLSLMForConditionalGeneration

    path = build_mini()
    model = MiniLSLMForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return Distiller(model, AutoTokenizer.from_pretrained(path), k=4)


class _Exact:
    """A stand-in adapter whose 'speech' is the sentence's own token embeddings."""

    def __init__(self, emb, ids):
        self.emb, self.ids = emb, ids

    def __call__(self, frames):
        return frames

    def speech_embeddings(self, h, emb_weight):
        return self.emb[torch.tensor(self.ids)]


def test_student_reading_the_exact_tokens_matches_the_teacher(distiller, monkeypatch):
    """If the 'speech' embeddings are the question's own tokens, the student's input is the teacher's
    prompt token for token, so its distributions at the continuation positions equal the teacher's
    (KL ~ 0). A position off by one, a continuation fed unshifted, or the prompt's end misplaced
    gives KL of nats."""
    from lmeval_speech.mini.distill import kl

    d = distiller
    sentence = "The cat sat on the mat."
    tok_ids = d.tok.encode(" " + sentence, add_special_tokens=False)
    prompt = d.tok(f"Question: {sentence}\nAnswer:", add_special_tokens=False)["input_ids"]
    assert prompt[: len(d.before) - 1] + tok_ids + d.after == prompt  # the ' ' token is the sentence's first
    monkeypatch.setattr(d, "before", d.before[:-1])
    monkeypatch.setattr(d, "proj", _Exact(d.emb, tok_ids))
    with torch.no_grad():
        cont, t_logits = d.teacher([sentence])
        s_logits, _ = d.student_logits([torch.zeros(1, 1)], cont, [sentence], 0.0)
    assert cont.shape == (1, 4) and s_logits.shape == t_logits.shape
    assert float(kl(t_logits, s_logits)) < 1e-4
    # and another question read by the student is far from this teacher
    monkeypatch.setattr(d, "proj", _Exact(d.emb, d.tok.encode(" Why is the sky blue?", add_special_tokens=False)))
    with torch.no_grad():
        s_other, _ = d.student_logits([torch.zeros(1, 1)], cont, [sentence], 0.0)
    assert float(kl(t_logits, s_other)) > 0.1


def test_sentences_sharing_an_8gram_with_the_development_set_are_left_out(tmp_path):
    import json

    from lmeval_speech.mini.distill import load_sentences
    from lmeval_speech.mini.evaluate import DEV, load_easy

    q = load_easy(DEV)[0]
    leak = (q["question"] + " " + " ".join(q["options"])).strip()
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps({"sentences": ["A harmless sentence about boats and rivers.", leak], "stats": {}}))
    assert load_sentences(corpus) == ["A harmless sentence about boats and rivers."]


def test_an_adapter_with_a_residual_builds_a_model_that_applies_it(tmp_path):
    """The shipped file format: ``residual.*`` in the adapter file turns the residual on in the built model."""
    from safetensors.torch import load_file, save_file

    from lmeval_speech.mini.build import ADAPTER_FILE, build_mini
    from lmeval_speech.mini.modeling import MiniLSLMForConditionalGeneration

    state = load_file(str(ADAPTER_FILE))
    g = torch.Generator().manual_seed(0)  # fixed weights: the built model is cached once per machine
    d = state["linear2.weight"].shape[0]
    state["residual.weight"] = torch.randn(d, d, generator=g) * 1e-3
    state["residual.bias"] = torch.randn(d, generator=g) * 1e-3
    path = tmp_path / "adapter.safetensors"
    save_file(state, str(path))
    model = MiniLSLMForConditionalGeneration.from_pretrained(build_mini(path), dtype=torch.float32)
    proj = model.multi_modal_projector
    assert model.config.ctc_residual and proj.residual is not None
    assert torch.equal(proj.residual.weight, state["residual.weight"])
    assert proj.temperature == pytest.approx(float(state["ctc_temperature"]))


def test_wordnet_questions_never_ask_for_a_held_out_answer(tmp_path):
    """Stage 2's spoken questions: a noun that is an option of the easy-question check or its development
    set is never asked for, nor a definition sharing an 8-gram with the checks or MMLU's test questions."""
    from lmeval_speech.mini.distill import held_out_words, wordnet_questions
    from lmeval_speech.mini.evaluate import DEV, load_easy

    assert {"zebra", "nile", "skin"} <= held_out_words()  # answers of each set ("The Nile")
    dev_q = max((r["question"] for r in load_easy(DEV)), key=lambda q: len(q.split())).rstrip("?")
    assert len(dev_q.split()) >= 8
    lines = ["00001 03 n 01 zebra 0 000 | any of several fleet black-and-white striped African equines",
             "00002 03 n 01 catapult 0 000 | a device that launches aircraft from a warship; a sling",
             "00003 03 n 01 river 0 000 | " + " ".join(["a", "word"] * 2) + " " + dev_q.lower(),
             "00004 03 n 01 heroine 0 000 | the main good female character in a work of fiction",
             "00005 03 n 02 pelt 0 skin 0 000 | body covering of a living animal",  # "skin" is a held-out answer
             "  a header line of the file"]
    data = tmp_path / "data.noun"
    data.write_text("\n".join(lines) + "\n")
    qs = wordnet_questions(data)
    assert len(qs) == 2 and all(q.endswith("?") for q in qs)
    assert "a device that launches aircraft from a warship?" in qs[0] and "female character" in qs[1]


@pytest.mark.slow
def test_stage_two_runs_checkpoints_and_resumes(tmp_path):
    """``distill`` end to end on a tiny corpus: step 0 is the shipped model (KL measured), a checkpoint
    and an adapter with its residual are written, and ``--resume`` continues at the saved step."""
    import json

    from safetensors.torch import load_file

    from lmeval_speech.mini import distill
    from lmeval_speech.mini.train import load_checkpoint

    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps({"sentences": ["The river runs to the sea.", "A small boat sails at dawn.",
                                                "Birds sing in the old oak tree.", "Snow covers the quiet hills."],
                                  "stats": {}}))
    args = ["--data", "sentences", "--corpus", str(corpus), "--ckpt-dir", str(tmp_path / "ck"), "--valid", "2",
            "--batch", "2", "--k", "2", "--eval-every", "1"]
    distill.main(args + ["--max-steps", "1"])
    ck = load_checkpoint(tmp_path / "ck")
    assert ck["state"]["step"] == 1 and len(ck["state"]["valid"]) == 2  # step 0 and step 1
    adapter = load_file(str(tmp_path / "ck" / "out" / "adapter.safetensors"))
    assert "residual.weight" in adapter and float(adapter["residual.weight"].abs().sum()) > 0
    distill.main(args + ["--max-steps", "2", "--resume"])
    assert load_checkpoint(tmp_path / "ck")["state"]["step"] == 2
    stats = json.loads((tmp_path / "ck" / "out" / "training.json").read_text())
    from lmeval_speech.mini.build import WEIGHTS_DIR

    stage1 = json.loads((WEIGHTS_DIR / "training.json").read_text())["summary"]
    assert stats["stage2"]["steps"] == 2 and stats["summary"] == stage1  # stage 1's log kept beside
