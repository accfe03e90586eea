"""The two calibration samplers: token offsets (default) and SVD-LLM's character offsets."""
import random

import pytest
import torch

from svdcore import params as params_module
from svdcore.calibration import calibration_windows, char_offset_windows
from svdcore.data import random_windows, tokenize
from svdcore.errors import UserError


def char_tokenizer(text, **_):
    """One token per character (its code point): a window is then readable as a slice of text."""
    return {"input_ids": [ord(c) for c in text]}


def word_tokenizer(text, **_):
    return {"input_ids": [len(w) for w in text.split()]}


TEXT = "".join(chr(97 + (i * 7 + i // 26) % 26) for i in range(5000))


def test_char_windows_are_the_first_tokens_of_slices_at_seeded_character_offsets():
    windows = char_offset_windows(char_tokenizer, TEXT, samples=6, seqlen=40, seed=3)
    rng = random.Random(3)  # the offsets are Python's seeded draws, so the windows can be predicted
    for window in windows:
        start = rng.randint(0, len(TEXT) - 40 - 1)
        assert "".join(map(chr, window.tolist())) == TEXT[start:start + 40]
    assert torch.equal(windows, char_offset_windows(char_tokenizer, TEXT, 6, 40, 3))
    assert not torch.equal(windows, char_offset_windows(char_tokenizer, TEXT, 6, 40, 4))


def test_char_windows_skip_slices_that_tokenize_short():
    # words of 1..9 letters between long runs of spaces: some 10 * seqlen character slices hold
    # fewer than seqlen words and must be skipped, never padded
    text = "".join("x" * (1 + i % 9) + " " * (3 if i % 50 < 40 else 60) for i in range(2000))
    windows = char_offset_windows(word_tokenizer, text, samples=20, seqlen=12, seed=0)
    assert windows.shape == (20, 12)
    rng, expected, skipped = random.Random(0), [], 0
    while len(expected) < 20:
        start = rng.randint(0, len(text) - 12 - 1)
        ids = word_tokenizer(text[start:start + 120])["input_ids"]
        if len(ids) >= 12:
            expected.append(ids[:12])
        else:
            skipped += 1
    assert skipped > 0 and windows.tolist() == expected


def test_char_windows_refuse_a_text_too_short_for_the_window():
    with pytest.raises(UserError, match=r"^calibration.seqlen: 50 tokens asked for, but the text has only 30"):
        char_offset_windows(char_tokenizer, TEXT[:30], 2, 50, 0)
    sparse = ("x" + " " * 99) * 20  # 20 words in 2,000 characters: no slice gives 50 tokens
    with pytest.raises(UserError, match=r"^calibration.seqlen: \d+ random slices of the text gave fewer than 50"):
        char_offset_windows(word_tokenizer, sparse, 1, 50, 0)


def test_the_token_sampler_is_random_windows_of_the_tokenized_text():
    a = calibration_windows(char_tokenizer, TEXT, "tokens", 5, 32, 0)
    assert torch.equal(a, random_windows(tokenize(char_tokenizer, TEXT), 5, 32, 0))
    given = torch.arange(1000, 1200)  # ids the caller already has are used as they are
    assert torch.equal(calibration_windows(char_tokenizer, TEXT, "tokens", 5, 32, 0, given),
                       random_windows(given, 5, 32, 0))
    b = calibration_windows(char_tokenizer, TEXT, "chars", 5, 32, 0)
    assert torch.equal(b, char_offset_windows(char_tokenizer, TEXT, 5, 32, 0)) and not torch.equal(a, b)
    with pytest.raises(ValueError, match=r"sampler 'bytes' is none of"):  # the user's: params' types (below)
        calibration_windows(char_tokenizer, TEXT, "bytes", 5, 32, 0)


def test_the_sampler_param_is_checked():
    from conftest import with_value

    params_module.validate(with_value("calibration.sampler", "chars"))
    with pytest.raises(UserError, match=r"^calibration.sampler: expected one of tokens, chars, got 'words'$"):
        params_module.validate(with_value("calibration.sampler", "words"))
