"""Calibration windows: which `samples x seqlen` tokens the statistics pass sees.

Two samplers, both deterministic for a seed:
- `tokens` (the default): tokenize the whole text once, cut windows at random token offsets.
- `chars`: the sampler of the official SVD-LLM code. Pick a random character offset in the text
  (Python's `random`, seeded), tokenize the next `10 * seqlen` characters on their own, keep the
  first `seqlen` tokens; a slice that yields fewer is skipped. Its windows start wherever the
  offset falls, often inside a word. On the default model and text, seed 3 draws windows that
  reproduce the figures the official code measured here (README, Results).
"""
import random

import torch

from .data import random_windows, tokenize
from .errors import UserError
from .choices import SAMPLERS

CHARS_PER_TOKEN_SLICE = 10  # the official slice: 10 characters per wanted token
MAX_SKIPS_PER_WINDOW = 100  # a text that keeps giving short slices is too short for seqlen


def char_offset_windows(tokenizer, text: str, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """SVD-LLM's sampler (see the module docstring): `samples` windows of `seqlen` tokens."""
    if len(text) <= seqlen:  # randint below needs len(text) - seqlen - 1 >= 0
        raise UserError(f"calibration.seqlen: {seqlen} tokens asked for, but the text has only {len(text)} characters")
    rng = random.Random(seed)
    windows, skipped = [], 0
    while len(windows) < samples:
        start = rng.randint(0, len(text) - seqlen - 1)
        ids = tokenize(tokenizer, text[start:start + CHARS_PER_TOKEN_SLICE * seqlen])
        if ids.numel() >= seqlen:
            windows.append(ids[:seqlen])
            continue
        skipped += 1
        if skipped > MAX_SKIPS_PER_WINDOW * samples:
            raise UserError(f"calibration.seqlen: {skipped} random slices of the text gave fewer than {seqlen} "
                            f"tokens; the text is too short for the chars sampler (use sampler tokens)")
    return torch.stack(windows)


def calibration_windows(tokenizer, text: str, sampler: str, samples: int, seqlen: int, seed: int,
                        ids: torch.Tensor | None = None) -> torch.Tensor:
    """The calibration windows (samples x seqlen token ids) drawn by `sampler` (SAMPLERS).
    `ids`: the whole text tokenized, when the caller has it already (the `tokens` sampler needs it)."""
    if sampler == "tokens":
        return random_windows(tokenize(tokenizer, text) if ids is None else ids, samples, seqlen, seed)
    if sampler == "chars":
        return char_offset_windows(tokenizer, text, samples, seqlen, seed)
    raise ValueError(f"sampler {sampler!r} is none of {SAMPLERS}")  # params.yaml's types check calibration.sampler
