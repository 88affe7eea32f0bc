"""What every task scorer takes and returns.

A scorer compares completions with a task's reference rows and returns headline metrics plus
one result per sample, so that `caft compare` can bootstrap over test rows.

Inputs, shared by every scorer:
- `references`: the task's test rows, as read from its data file, each with an added `"id"` (str).
- `completions`: aligned with `references`, one list of generated strings per row. A list has more
  than one string when n samples are drawn per prompt, as pass@k needs.
- `train_references` (optional): training rows of the same task, for novelty metrics.

Example:
    result = score_gsm8k(references, [["... #### 18"], ["42"]])
    result.metrics["accuracy"]       # 0.5
    result.samples[0]["correct"]     # True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScoreResult:
    """Headline metrics (one float per key) and per-sample results aligned with the references."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]]
    # Metrics per sample that average to a headline metric: {headline name: per-sample key}.
    # `caft compare` bootstraps these over test rows; the other headline metrics are corpus-level.
    per_sample_metrics: dict[str, str] = field(default_factory=dict)


class ScoringError(ValueError):
    """Raised for inputs a scorer cannot score, with a message that names the row and what to do."""


def check_inputs(references: Sequence[dict], completions: Sequence[Sequence[str]]) -> None:
    """Raise ScoringError unless every row has an id and a non-empty list of string completions."""
    if not references:
        raise ScoringError("got no reference rows. Pass at least one row to score")
    if len(references) != len(completions):
        raise ScoringError(
            f"got {len(references)} reference rows but {len(completions)} completion lists. "
            "Pass one list of completions per reference row, in the same order"
        )
    for index, (row, row_completions) in enumerate(zip(references, completions)):
        if "id" not in row:
            raise ScoringError(f"reference row {index} has no 'id' key. Add the row's id before scoring")
        if isinstance(row_completions, str) or not isinstance(row_completions, Sequence):
            raise ScoringError(
                f"completions for row {row['id']!r} are a {type(row_completions).__name__}, "
                "expected a list of strings (one per generated sample)"
            )
        if not row_completions:
            raise ScoringError(f"row {row['id']!r} has no completions. Pass at least one string per row")
        for completion in row_completions:
            if not isinstance(completion, str):
                raise ScoringError(
                    f"a completion for row {row['id']!r} is a {type(completion).__name__}, expected a str"
                )
