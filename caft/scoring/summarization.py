"""ROUGE scores for dialogue summaries (DialogSum), so summarization runs get the field's usual metric.

Inputs, as in `caft.scoring.base`:
- `references`: DialogSum rows with an added `"id"`. A dev or train row has one reference in
  `summary`, and a test row has three, in `summary1`, `summary2` and `summary3`. Every non-empty
  one of these four fields is used as a reference.
- `completions`: for each row, a list of one or more generated summaries.
- `train_references`: accepted so that every scorer has the same signature. ROUGE does not use it.

Metrics: ROUGE-1, ROUGE-2 and ROUGE-L F-measure in [0, 1], computed by `rouge_score` (0.1.2) with
the Porter stemmer. With several references, a completion gets the maximum F-measure over them,
separately for each ROUGE type. This is what `RougeScorer.score_multi` does and the common
convention, but some papers average over references instead, which gives lower numbers. `mean_length_words`
counts whitespace-separated words. Each metric is averaged over a row's completions, then over rows.

Example:
    result = score_dialogsum(rows, [["#Person1# asks #Person2# for help."], ...])
    result.metrics["rougeL"]          # 0.31
    result.samples[0]["rouge1"]       # mean ROUGE-1 of row 0's completions
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from rouge_score import rouge_scorer

from .base import ScoreResult, ScoringError, check_inputs

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# Dev and train rows have `summary`, and test rows have `summary1` to `summary3`.
REFERENCE_FIELDS = ("summary", "summary1", "summary2", "summary3")


def reference_summaries(row: dict[str, Any]) -> list[str]:
    """Return the non-empty reference summaries of a DialogSum row, raising ScoringError if none."""
    summaries = []
    for name in REFERENCE_FIELDS:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            summaries.append(value)
    if not summaries:
        raise ScoringError(
            f"DialogSum row {row.get('id')!r} has no reference summary, because the fields "
            f"{', '.join(REFERENCE_FIELDS)} are all missing or empty. "
            "Fix the row or drop it from the test set"
        )
    return summaries


def score_dialogsum(
    references: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    *,
    train_references: Sequence[dict[str, Any]] | None = None,
) -> ScoreResult:
    """Score generated summaries with ROUGE-1/2/L F-measure, taking the best of a row's references."""
    check_inputs(references, completions)
    if train_references is not None:
        logger.debug("score_dialogsum ignores train_references: ROUGE has no novelty metric")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

    samples: list[dict[str, Any]] = []
    for row, row_completions in zip(references, completions):
        targets = reference_summaries(row)
        per_completion = []
        for completion in row_completions:
            best = scorer.score_multi(targets, completion)
            scores = {name: float(best[name].fmeasure) for name in ROUGE_TYPES}
            scores["length_words"] = len(completion.split())
            per_completion.append(scores)

        sample: dict[str, Any] = {"id": row["id"]}
        for name in ROUGE_TYPES:
            sample[name] = fmean(scores[name] for scores in per_completion)
        sample["length_words"] = fmean(scores["length_words"] for scores in per_completion)
        sample["completions"] = per_completion
        samples.append(sample)

    metrics = {name: fmean(sample[name] for sample in samples) for name in ROUGE_TYPES}
    metrics["mean_length_words"] = fmean(sample["length_words"] for sample in samples)
    return ScoreResult(
        metrics=metrics,
        samples=samples,
        per_sample_metrics={name: name for name in ROUGE_TYPES},
    )
