"""Command-line entry points for evaluation: `caft tasks`, `caft eval` and `caft score`.

- `caft tasks list` shows the presets; `caft tasks prepare TASK --output-dir DIR` writes
  `DIR/TASK.train.jsonl` and `DIR/TASK.test.jsonl` with the task's fixed prompt and split.
- `caft eval` generates completions with a fine-tuned model and scores them (see `evaluate.py`).
- `caft score` scores predictions made elsewhere (see `scoring/run.py`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .tasks import TASKS, get_task, prepare_task, write_jsonl

logger = logging.getLogger(__name__)


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one --option per dataclass field; fields without a default become required options."""
    for item in fields(cls):
        flag = "--" + item.name.replace("_", "-")
        annotation = str(item.type)
        required = item.default is MISSING and item.default_factory is MISSING
        help_text = item.metadata.get("help", "")
        if "bool" in annotation:
            default = item.default
            parser.add_argument(
                flag,
                dest=item.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{help_text} Default: {default}.",
            )
            continue
        kind: type = str
        if annotation.startswith("int"):
            kind = int
        elif annotation.startswith("float"):
            kind = float
        suffix = "" if required or item.default is None else f" Default: {item.default}."
        parser.add_argument(
            flag, dest=item.name, type=kind, required=required, default=None if required else item.default,
            help=help_text + suffix,
        )


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def command_tasks_list(args: argparse.Namespace) -> int:
    for task in TASKS.values():
        print(f"{task.name:<10} {task.family:<14} {task.description}")
    return 0


def command_tasks_prepare(args: argparse.Namespace) -> int:
    task = get_task(args.task)
    split = prepare_task(
        task,
        test_rows=args.test_rows,
        train_rows=args.train_rows,
        max_prompt_chars=args.max_prompt_chars,
        data_dir=args.data_dir,
    )
    output_dir = Path(args.output_dir)
    written = []
    for name, rows in (("train", split.train), ("test", split.test)):
        if rows:
            written.append(write_jsonl(rows, output_dir / f"{task.name}.{name}.jsonl"))
    for path in written:
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{path}: {count} rows")
    if split.dropped.get("train") or split.dropped.get("test"):
        print(
            f"dropped for prompts over {args.max_prompt_chars} characters: "
            f"{split.dropped['train']} train, {split.dropped['test']} test rows"
        )
    if split.dropped["train_duplicates_of_test"]:
        print(f"dropped {split.dropped['train_duplicates_of_test']} training rows identical to a test row")
    if not split.train:
        print(f"{task.name} has no training split; train on another file of the same family")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalOptions, run_eval

    options = EvalOptions(**{item.name: getattr(args, item.name) for item in fields(EvalOptions)})
    report = run_eval(options)
    _print_metrics(report, options.output)
    return 0


def command_score(args: argparse.Namespace) -> int:
    from .evaluate import _write_json
    from .scoring.run import result_json, score_file

    get_task(args.task)
    options: dict[str, Any] = {}
    if args.task in ("humaneval", "mbpp"):
        options = {"timeout_s": args.timeout, "memory_mb": args.memory_mb, "workers": args.workers}
    result = score_file(args.task, args.data, args.predictions, train=args.train_data, **options)
    report = result_json(args.task, result, {"data": args.data, "predictions": args.predictions})
    _write_json(Path(args.output), report)
    _print_metrics(report, args.output)
    return 0


def _print_metrics(report: dict[str, Any], output: str) -> None:
    for name, value in report.items():
        if isinstance(value, float):
            print(f"{name:<24} {value:.4f}")
    print(f"wrote {output}")


def add_eval_commands(commands: Any) -> None:
    """Register `caft tasks`, `caft eval` and `caft score` on the CLI's subparsers."""
    from .evaluate import EvalOptions

    tasks = commands.add_parser("tasks", help="List task presets, or prepare a task's train/test files.")
    task_commands = tasks.add_subparsers(dest="tasks_command", required=True)
    listing = task_commands.add_parser("list", help="List the task presets.")
    listing.set_defaults(handler=command_tasks_list)
    prepare = task_commands.add_parser(
        "prepare",
        help="Write TASK.train.jsonl and TASK.test.jsonl with the task's fixed prompt and split.",
        description="Turn a task's raw files in the assets folder into conversation JSONL for "
        "`caft finetune` and `caft eval`. The split is fixed, so every user gets the same rows.",
    )
    prepare.add_argument("task", help=f"Task name: {', '.join(TASKS)}.")
    prepare.add_argument("--output-dir", required=True, help="Folder for the two JSONL files.")
    prepare.add_argument("--test-rows", type=int, help="Keep the first N test rows of the fixed order.")
    prepare.add_argument("--train-rows", type=int, help="Keep the first N training rows of the fixed order.")
    prepare.add_argument(
        "--max-prompt-chars",
        type=int,
        help="Drop rows whose prompt is longer (characters), for models with a short context.",
    )
    prepare.add_argument("--data-dir", help="Assets folder with the raw data (default: CAFT_ASSETS or ../shared).")
    prepare.set_defaults(handler=command_tasks_prepare)

    evaluate = commands.add_parser(
        "eval",
        help="Generate answers to a task's test prompts with a model, and score them.",
        description="Generate (greedy unless --do-sample) and score with the task's metrics. Writes the "
        "scores to --output and the answers to --predictions.",
    )
    _add_dataclass_options(evaluate, EvalOptions)
    evaluate.set_defaults(handler=command_eval)

    score = commands.add_parser(
        "score",
        help="Score predictions made elsewhere against a task's test data.",
        description='Predictions are JSONL rows {"id": ..., "completion": "..."} (or "completions": [...] '
        "for pass@k) with the task's own ids. Every test id must appear exactly once.",
    )
    score.add_argument("--task", required=True, help=f"Task name: {', '.join(TASKS)}.")
    score.add_argument("--data", required=True, help="Test file: prepared by `caft tasks prepare`, or the raw file.")
    score.add_argument("--predictions", required=True, help="Predictions JSONL.")
    score.add_argument("--output", required=True, help="Where to write the scores (JSON).")
    score.add_argument("--train-data", help="Training file of the same task, for novelty metrics.")
    score.add_argument(
        "--timeout", type=_positive(float), default=10.0, help="Code tasks: seconds per program. Default: 10."
    )
    score.add_argument(
        "--memory-mb", type=_positive(int), default=1024, help="Code tasks: memory per program (MB). Default: 1024."
    )
    score.add_argument("--workers", type=_positive(int), default=2, help="Code tasks: programs run at once. Default: 2.")
    score.set_defaults(handler=command_score)

