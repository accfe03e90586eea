"""The papers' text formats and the token windows cut from them."""
import pytest
import torch

from conftest import tiny_tokenizer
from svdcore.data import eval_windows, join_rows, leading_tokens, load_text, random_windows, tokenize
from svdcore.errors import UserError


def test_wikitext_evaluation_string_is_the_standard_one():
    # 1,294,336 characters: the length of "\n\n".join(rows) of the HF wikitext-2-raw-v1 test split
    text = load_text("wikitext2")
    assert len(text) == 1_294_336
    # rows "", " = Robert Boulter = \n", "", " Robert ..." joined by blank lines
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")


def test_row_rebuild_formats():
    assert join_rows([" a b ", " ", " c "], "wikitext") == " a b \n" + "\n\n" + "" + "\n\n" + " c \n"
    assert join_rows([" a b ", " c "], "ptb") == "a b\n\nc"


def test_random_windows_follow_the_seed():
    ids = torch.arange(1000)
    a, b, c = (random_windows(ids, 5, 16, seed) for seed in (0, 0, 1))
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 16)) for w in a)  # contiguous slices
    with pytest.raises(UserError, match="calibration.seqlen"):
        random_windows(ids, 1, 1000, 0)


def test_eval_windows_are_consecutive_and_limited():
    ids = torch.arange(103)
    assert torch.equal(eval_windows(ids, 10, 0), torch.arange(100).view(10, 10))
    assert eval_windows(ids, 10, 3).shape == (3, 10)
    with pytest.raises(UserError, match="evaluate.seqlen"):
        eval_windows(ids, 200, 0)


def test_leading_tokens_are_the_whole_texts_first_tokens():
    """On the tests' byte-level BPE, counts from one token to past the end of the text (where the
    whole text is tokenized); test_smollm2 checks SmolLM2's own tokenizer."""
    tokenizer = tiny_tokenizer()
    for dataset, counts in (("wikitext2", (1, 3 * 512, 40_000)), ("ptb", (96, 10**7))):
        text = load_text(dataset)
        whole = tokenize(tokenizer, text)
        for count in counts:
            assert torch.equal(leading_tokens(tokenizer, text, count), whole[:count]), (dataset, count)
        assert torch.equal(leading_tokens(tokenizer, text, 0), whole), dataset  # 0: the whole text
