"""Text datasets as the papers format them, and token windows cut from them."""
import os
from pathlib import Path

import torch

from .errors import UserError

# name -> (file under data/, format). Formats rebuild the rows of the Hugging Face datasets
# so that the joined string is exactly the one the papers evaluate on.
BUILTIN = {
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", "wikitext"),
    "wikitext2-valid": ("wikitext-2/valid.txt", "wikitext"),
    "ptb": ("ptb/ptb.test.txt", "ptb"),
    "ptb-valid": ("ptb/ptb.valid.txt", "ptb"),
}


def data_dir() -> Path:
    return Path(os.environ.get("SVDCORE_DATA", "data"))


def join_rows(lines: list[str], fmt: str) -> str:
    """The evaluation string: rows joined with blank lines, as GPTQ/SVD-LLM build it.

    WikiText rows keep their newline and blank rows become empty; PTB rows are stripped lines.
    """
    if fmt == "wikitext":
        rows = [line + "\n" if line.strip() else "" for line in lines]
    else:
        rows = [line.strip() for line in lines]
    return "\n\n".join(rows)


def _read_lines(path: Path) -> list[str]:
    from datasets import load_dataset

    rows = load_dataset("text", data_files=str(path), split="train", keep_linebreaks=False)
    return list(rows["text"])


def load_text(name: str) -> str:
    """A built-in dataset name, a local text file, or a hub spec `path:config:split`."""
    if name in BUILTIN:
        rel, fmt = BUILTIN[name]
        path = data_dir() / rel
        if not path.is_file():
            raise UserError(f"dataset {name!r}: data file {path} is missing (it ships in the repository's data/)")
        return join_rows(_read_lines(path), fmt)
    path = Path(name)
    if path.is_file():
        return join_rows(_read_lines(path), "wikitext")
    if name.count(":") != 2 or path.suffix in (".txt", ".raw"):
        raise UserError(f"dataset {name!r}: not a built-in name ({', '.join(BUILTIN)}), "
                        f"not an existing file, and not a hub spec path:config:split")
    from datasets import load_dataset

    hub_path, config, split = name.split(":")
    try:
        rows = load_dataset(hub_path, config or None, split=split)
    except Exception as e:  # network, unknown name: the datasets library has many error types
        raise UserError(f"dataset {name!r}: could not load it from the hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    field = "text" if "text" in rows.column_names else rows.column_names[0]
    return join_rows([r.rstrip("\n") for r in rows[field]], "wikitext")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One 1-D tensor of token ids for the whole text."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# tokens past those asked for that a prefix must also hold, as insurance: a tokenizer may end a text
# differently from the same place inside it (an end-of-text token, a trailing space merged with the
# line end after it). Neither SmolLM2's nor the tests' tokenizer does so at a line end
PREFIX_SLACK = 64


def leading_tokens(tokenizer, text: str, count: int) -> torch.Tensor:
    """tokenize(tokenizer, text)[:count], from as little of the text as that takes: a prefix cut at
    a line end, doubled until it holds PREFIX_SLACK tokens more than asked for (no token reaches
    from one line's words into the next line's). Evaluation reads the first windows of a split;
    tokenizing all of it took most of a tiny model's evaluation. `count` 0 = the whole text."""
    chars = 8 * count  # about 4 characters a token in English for a large vocabulary: one try mostly
    while count and chars < len(text):
        cut = text.find("\n", chars)
        if cut < 0:
            break
        ids = tokenize(tokenizer, text[:cut])
        if ids.numel() >= count + PREFIX_SLACK:
            return ids[:count]
        chars *= 2
    ids = tokenize(tokenizer, text)
    return ids[:count] if count else ids


def random_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at random offsets (samples x seqlen)."""
    if ids.numel() <= seqlen:
        raise UserError(f"calibration.seqlen: {seqlen} tokens asked for, but the dataset has only {ids.numel()}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int) -> torch.Tensor:
    """Consecutive non-overlapping windows (the papers' protocol); max_windows 0 = all."""
    count = ids.numel() // seqlen
    if count == 0:
        raise UserError(f"evaluate.seqlen: {seqlen} is longer than the whole dataset ({ids.numel()} tokens)")
    if max_windows:
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)
