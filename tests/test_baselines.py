"""Count-based baselines for token t+k, against a plain dictionary count."""

from collections import Counter, defaultdict

import pytest

from caft.baselines import baseline_accuracies, fit_skip_bigram


def _rows(sequences, prompt_length=1):
    rows = []
    for sequence in sequences:
        labels = [-100] * prompt_length + sequence[prompt_length:]
        rows.append({"input_ids": sequence, "labels": labels})
    return rows


def _naive(train, evaluation, offset):
    followers = defaultdict(Counter)
    unigram = Counter()
    for row in train:
        for t in range(len(row["input_ids"]) - offset):
            target = row["labels"][t + offset]
            if target != -100:
                followers[row["input_ids"][t]][target] += 1
                unigram[target] += 1
    fallback = max(sorted(unigram), key=lambda token: unigram[token])
    hits = total = unigram_hits = 0
    for row in evaluation:
        for t in range(len(row["input_ids"]) - offset):
            target = row["labels"][t + offset]
            if target == -100:
                continue
            counts = followers.get(row["input_ids"][t])
            guess = max(sorted(counts), key=lambda token: counts[token]) if counts else fallback
            hits += guess == target
            unigram_hits += fallback == target
            total += 1
    return hits / total, unigram_hits / total


def test_matches_naive_count():
    import random

    generator = random.Random(0)
    # A repeating pattern plus noise, so t+k is partly predictable from token t.
    make = lambda: [
        generator.choice([1, 2, 3]) if generator.random() < 0.3 else (i % 7) + 1 for i in range(30)
    ]  # noqa: E731
    train = _rows([make() for _ in range(40)])
    evaluation = _rows([make() for _ in range(10)])
    result = baseline_accuracies(train, evaluation, [2, 3, 4], vocab_size=10)
    for index, offset in enumerate([2, 3, 4]):
        skip_bigram, unigram = _naive(train, evaluation, offset)
        assert result["skip_bigram_top1"][index] == pytest.approx(skip_bigram, abs=1e-6)
        assert result["unigram_top1"][index] == pytest.approx(unigram, abs=1e-6)


def test_perfectly_periodic_sequence_is_predicted():
    sequence = [(i % 5) + 1 for i in range(40)]
    result = baseline_accuracies(_rows([sequence]), _rows([sequence]), [2, 5], vocab_size=8)
    assert result["skip_bigram_top1"] == [1.0, 1.0]


def test_unseen_token_falls_back_to_unigram():
    table, fallback = fit_skip_bigram(_rows([[1, 2, 3, 3, 3]], prompt_length=0), offset=2, vocab_size=9)
    assert table[8] == -1
    assert fallback == 3
