"""Count-based guesses of token t+k, to tell whether a head's accuracy means anything.

A head predicting token t+k from a frozen model can look weak (20% top-1) or strong, and the
number only means something beside what a trivial predictor achieves on the same targets:

- unigram: always guess the most frequent target token;
- skip-bigram: guess the token that most often followed token x_t at distance k in the training
  rows, falling back to the unigram guess for tokens never seen.

Both are fitted on training rows and scored on held-out rows, on exactly the positions where a
head is scored: real tokens t whose token t+k is a supervised target.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .loss import IGNORE_INDEX


def _pairs(dataset: Dataset, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target t+offset) for every scored position of `dataset`: two (N,) tensors."""
    inputs, targets = [], []
    for index in range(len(dataset)):
        row = dataset[index]
        input_ids = torch.as_tensor(row["input_ids"])
        labels = torch.as_tensor(row["labels"])
        if len(input_ids) <= offset:
            continue
        source, target = input_ids[:-offset], labels[offset:]
        valid = target != IGNORE_INDEX
        inputs.append(source[valid])
        targets.append(target[valid])
    if not inputs:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(inputs), torch.cat(targets)


def fit_skip_bigram(train: Dataset, offset: int, vocab_size: int) -> tuple[torch.Tensor, int]:
    """Return (table, fallback): table[x] is the most frequent token at distance `offset` after x, or -1."""
    sources, targets = _pairs(train, offset)
    table = torch.full((vocab_size,), -1, dtype=torch.long)
    if sources.numel() == 0:
        return table, 0
    fallback = int(torch.bincount(targets, minlength=vocab_size).argmax())

    # Count (x, y) pairs without a vocab x vocab matrix: encode each pair as one int64 key.
    keys = sources * vocab_size + targets
    unique_keys, counts = torch.unique(keys, return_counts=True)
    pair_sources, pair_targets = unique_keys // vocab_size, unique_keys % vocab_size
    # Order by source, then by count (highest first), so the first pair of each source wins.
    order = torch.argsort(counts, descending=True, stable=True)
    order = order[torch.argsort(pair_sources[order], stable=True)]
    pair_sources, pair_targets = pair_sources[order], pair_targets[order]
    first = torch.ones_like(pair_sources, dtype=torch.bool)
    first[1:] = pair_sources[1:] != pair_sources[:-1]
    table[pair_sources[first]] = pair_targets[first]
    return table, fallback


def baseline_accuracies(train: Dataset, evaluation: Dataset, offsets: list[int], vocab_size: int) -> dict:
    """Top-1 accuracy of the unigram and skip-bigram guesses on `evaluation`, one entry per offset."""
    unigram, skip_bigram = [], []
    for offset in offsets:
        table, fallback = fit_skip_bigram(train, offset, vocab_size)
        sources, targets = _pairs(evaluation, offset)
        if targets.numel() == 0:
            unigram.append(float("nan"))
            skip_bigram.append(float("nan"))
            continue
        guesses = table[sources]
        guesses = torch.where(guesses < 0, torch.full_like(guesses, fallback), guesses)
        unigram.append(round((targets == fallback).float().mean().item(), 6))
        skip_bigram.append(round((guesses == targets).float().mean().item(), 6))
    return {"offsets": offsets, "unigram_top1": unigram, "skip_bigram_top1": skip_bigram}
