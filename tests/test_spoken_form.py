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
    ("Compute n-1 items.", "Compute n1 items."),
    ("Is 5 - 3 two?", "Is 5 3 two?"),
])
def test_texts_that_differ_in_a_symbol_are_heard_differently(tmp_path, a, b):
    assert not np.array_equal(get_audio(a, cache_dir=tmp_path), get_audio(b, cache_dir=tmp_path))


def test_a_matrix_is_spoken_not_read_as_phoneme_code(tmp_path):
    # espeak-ng reads [[...]] as phonemes: the whole matrix came out as one short syllable
    matrix = get_audio("A = [[3, 2, -9], [-6, -4, 18], [12, 8, -36]].", cache_dir=tmp_path)
    spelled = get_audio("A = 3, 2, minus 9, minus 6, minus 4, 18, 12, 8, minus 36.", cache_dir=tmp_path)
    assert len(matrix) > 0.8 * len(spelled)


def test_a_blank_is_said():
    assert spoken_form("The ____ of a cell is its nucleus.") == "The blank of a cell is its nucleus."


def test_ordinary_text_and_hyphenated_words_pass_unchanged():
    for text in ("What is the capital city of France?", "A well-known X-ray of T-cell self-tests in COVID-19.",
                 "The war lasted 1914-1918, said the e-mail.", "Paris - the capital - is large."):
        assert spoken_form(text) == text


def test_the_rules_version_is_part_of_the_cache_key(monkeypatch):
    from lmeval_speech.audio import cache

    before = cache_key("x = -3", TTSSpec())
    monkeypatch.setattr(cache, "SPOKEN_FORM_VERSION", cache.SPOKEN_FORM_VERSION + 1)
    assert cache_key("x = -3", TTSSpec()) != before
