"""The speech twin says what the text twin shows: symbols espeak-ng drops are spoken (real espeak-ng)."""

from __future__ import annotations

import numpy as np
import pytest

from lmeval_speech.audio import TTSSpec
from lmeval_speech.audio.cache import cache_key, get_audio
from lmeval_speech.audio.spoken_form import spoken_form


@pytest.mark.parametrize("a, b", [
    ("B: x = –4.", "B: x = 4."),          # MMLU high_school_physics: an en dash as the sign
    ("D: -i.", "D: i."),                  # abstract_algebra: options 1, -1, i, -i
    ("ΔH < 0 and ΔS > 0.", "ΔH > 0 and ΔS < 0."),
    ("It is 10^-3 m.", "It is 10^3 m."),
    ("Is 5 - 3 two?", "Is 5 3 two?"),
])
def test_texts_that_differ_in_a_symbol_are_heard_differently(tmp_path, a, b):
    """The two texts' spoken forms differ (the symbol survives as something espeak-ng says), the audio is
    exactly the spoken form's (the cache speaks the rewrite, not the raw text: espeak-ng reading the raw
    text drops the symbol), and the two audios differ."""
    assert spoken_form(a) != spoken_form(b)
    heard = get_audio(a, cache_dir=tmp_path)
    assert np.array_equal(heard, get_audio(spoken_form(a), cache_dir=tmp_path))
    assert not np.array_equal(heard, get_audio(b, cache_dir=tmp_path))


def test_a_matrix_is_spoken_not_read_as_phoneme_code(tmp_path):
    # espeak-ng reads [[...]] as phonemes: the whole matrix came out as one short syllable
    matrix = get_audio("A = [[3, 2, -9], [-6, -4, 18], [12, 8, -36]].", cache_dir=tmp_path)
    spelled = get_audio("A = 3, 2, minus 9, minus 6, minus 4, 18, 12, 8, minus 36.", cache_dir=tmp_path)
    assert len(matrix) > 0.8 * len(spelled)


@pytest.mark.parametrize("text, said", [
    ("x = –4.", "x = −4."),                        # U+2212: espeak-ng says "minus"
    ("1, -1, i, -i", "1, −1, i, −i"),
    ("f(-1) and \"-1\" and $-5", "f(−1) and \"−1\" and $−5"),
    ("5 - 3 = 2; x – y = 1", "5 − 3 = 2; x − y = 1"),
    ("It is 10^-3 m; e^-x; 2^x = 8.", "It is 10 to the power of −3 m; e to the power of −x; 2 to the power of x = 8."),
    ("If ΔH < 0 and x<-1 and p -> q, x <= 3.", "If ΔH less than 0 and x less than −1 and p → q, x ≤ 3."),
    ("They are______ and more ______.", "They are blank and more blank ."),
    ("A = [[3, 2], [1, 4]].", "A = [ [3, 2], [1, 4] ]."),
    ("The years 1914–1918.", "The years 1914 to 1918."),
    ("~P ⊃ Q ∨ R ∧ S", "~P horseshoe Q vee R wedge S"),
    ("Statement 1 | Every group is abelian.", "Statement 1. Every group is abelian."),
    ("P(A|B)", "P(A bar B)"),
])
def test_symbols_are_written_as_words_or_symbols_espeak_speaks(text, said):
    assert spoken_form(text) == said


def test_ordinary_text_and_ambiguous_hyphens_pass_unchanged():
    for text in ("What is the capital city of France?", "A well-known X-ray of T-cell self-tests in COVID-19.",
                 "The war lasted 1914-1918, said the e-mail.", "Paris - the capital - is large.",
                 "Vitamin B-12, form W-2, U-235, an F-16, 3-D films and a 10-K filing.", "Use n-1 degrees.",
                 "In 1945 - a turning point - and Plan B - a backup.", "def __init__(self): __name__",
                 "Fe^3+ and SO4^2- ions.", "Compare x_1 and snake_case."):
        assert spoken_form(text) == text


def test_the_rules_version_is_part_of_the_cache_key(monkeypatch):
    from lmeval_speech.audio import cache

    before = cache_key("x = -3", TTSSpec())
    monkeypatch.setattr(cache, "SPOKEN_FORM_VERSION", cache.SPOKEN_FORM_VERSION + 1)
    assert cache_key("x = -3", TTSSpec()) != before


def test_word_error_rate_is_against_what_the_audio_says():
    """A transcript that writes down exactly what the speech twin said has no word errors (it scored
    0.40 against the text's symbols)."""
    from lmeval_speech.audio.asr import corpus_wer, word_error_rate

    said = "If delta H less than 0 and delta S greater than 0, then 2 to the power of x = 8."
    assert word_error_rate("If delta H < 0 and delta S > 0, then 2^x = 8.", said) == 0.0
    assert corpus_wer(["They are ______ and more.", "x < 1"], ["they are blank and more", "x less than 1"]) == 0.0


def test_the_rules_cannot_change_without_a_new_version():
    """VERSION keys the audio cache and the run conditions: a rule edited without a new VERSION would
    serve the old rules' cached audio and accept old captures, exit 0. Change a rule: bump VERSION and
    the pinned hash here together."""
    import hashlib

    from lmeval_speech.audio import spoken_form as rules

    digest = hashlib.sha256(repr([(p.pattern, r) for p, r in rules._RULES]).encode()).hexdigest()[:16]
    assert (rules.VERSION, digest) == (2, "350a31625d42f743")
