"""Score a predictions file against a task's references: the `caft score` job.

Predictions are JSONL rows `{"id": ..., "completion": "..."}`, or `{"id": ..., "completions": [...]}`
for several samples per prompt (pass@k). Every test id must appear exactly once: unknown, missing
and duplicate ids are errors that name the ids, because a silently shorter test set changes every
metric.

Example:
    >>> result = score_file("chebi20", "data/chebi20.test.jsonl", "preds.jsonl", train="data/chebi20.train.jsonl")
    >>> result.metrics["validity"]
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..tasks import get_task, load_references
from .base import ScoreResult, ScoringError

logger = logging.getLogger(__name__)

# Task name -> "module:function" inside caft.scoring, imported on use (RDKit and friends load slowly).
SCORERS = {
    "humaneval": "code:score_humaneval",
    "mbpp": "code:score_mbpp",
    "gsm8k": "math_answers:score_gsm8k",
    "dialogsum": "summarization:score_dialogsum",
    "chebi20": "molecules:score_chebi20",
    "cfp-gen": "proteins:score_cfp_gen",
}


def scorer_for(task_name: str):
    """Return the scoring function of `task_name` (raises TaskError for an unknown task)."""
    task = get_task(task_name)
    module_name, function = SCORERS[task.name].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, function)


def _show(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(item) for item in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def read_predictions(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read predictions JSONL into {id: [completion, ...]}; errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ScoringError(f"predictions {path} is a folder; give the predictions JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    predictions: dict[str, list[str]] = {}
    lines: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ScoringError(f"{path}:{number}: not a JSON line ({error})") from error
            if not isinstance(row, dict) or "id" not in row:
                raise ScoringError(f'{path}:{number}: expected an object with "id" and "completion"')
            if "completion" in row:
                completions = [row["completion"]]
            elif "completions" in row and isinstance(row["completions"], list) and row["completions"]:
                completions = row["completions"]
            else:
                raise ScoringError(
                    f'{path}:{number}: row has no "completion" (a string) or "completions" (a non-empty list)'
                )
            if not all(isinstance(item, str) for item in completions):
                raise ScoringError(f"{path}:{number}: completions must be strings")
            row_id = str(row["id"])
            if row_id in predictions:
                raise ScoringError(
                    f"{path}:{number}: id {row_id!r} already appeared on line {lines[row_id]}; give each id "
                    'once (several samples go in one row as "completions": [...])'
                )
            predictions[row_id] = completions
            lines[row_id] = number
    if not predictions:
        raise ScoringError(f"{path}: the predictions file is empty")
    return predictions


def align_predictions(
    references: list[dict[str, Any]], predictions: dict[str, list[str]], source: str = "predictions"
) -> list[list[str]]:
    """Order completions like the references; unknown or missing ids raise ScoringError naming them."""
    reference_ids = [row["id"] for row in references]
    known = set(reference_ids)
    unknown = [row_id for row_id in predictions if row_id not in known]
    missing = [row_id for row_id in reference_ids if row_id not in predictions]
    if unknown:
        raise ScoringError(
            f"{source}: {len(unknown)} ids are not in the test data: {_show(unknown)}. Check that the "
            "predictions and --data belong to the same task and split"
        )
    if missing:
        raise ScoringError(
            f"{source}: {len(missing)} test ids have no prediction: {_show(missing)}. Score the complete "
            "test set, or pass a --data file with only the rows you predicted"
        )
    return [predictions[row_id] for row_id in reference_ids]


def score_completions(
    task_name: str,
    references: list[dict[str, Any]],
    completions: list[list[str]],
    train_references: list[dict[str, Any]] | None = None,
    **options: Any,
) -> ScoreResult:
    """Score aligned completions with the task's scorer."""
    if not references:
        raise ScoringError(f"task {task_name!r}: the test set is empty, so there is nothing to score")
    scorer = scorer_for(task_name)
    return scorer(references, completions, train_references=train_references, **options)


def score_file(
    task_name: str,
    data: str | os.PathLike[str],
    predictions: str | os.PathLike[str],
    train: str | os.PathLike[str] | None = None,
    **options: Any,
) -> ScoreResult:
    """Score a predictions file against a task's test file (raw or prepared)."""
    task = get_task(task_name)
    references = load_references(task, data)
    completions = align_predictions(references, read_predictions(predictions), str(predictions))
    train_references = load_references(task, train) if train else None
    return score_completions(task.name, references, completions, train_references, **options)


def result_json(task_name: str, result: ScoreResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the output object of `caft score`: one key per metric, then the task, extras and the samples."""
    return {
        **result.metrics,
        "task": task_name,
        "num_rows": len(result.samples),
        "per_sample_metrics": result.per_sample_metrics,
        **(extra or {}),
        "samples": result.samples,
    }
