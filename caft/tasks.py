"""Task presets: the evaluation tasks, their raw files, one fixed prompt each and a fixed split.

A preset turns a task's raw file (as published, for example ChEBI-20's tab-separated
`validation.txt`) into conversation JSONL that `caft finetune` trains on and `caft eval` answers.
Each prepared row keeps the raw row under `reference`, so the scorers see the original fields:

    {"id": "92470518", "task": "chebi20",
     "messages": [{"role": "user", "content": "<fixed prompt + description>"},
                  {"role": "assistant", "content": "<gold SMILES>"}],
     "reference": {"CID": "92470518", "SMILES": "...", "description": "..."}}

The split is deterministic. A task with separate published splits uses them. A task with one file
is shuffled with a fixed seed (`SPLIT_SEED`) and cut into test and train rows. Row ids are the
task's own ids (HumanEval and MBPP `task_id`, the GSM8K 0-based line number, DialogSum `fname`,
ChEBI-20 `CID`, the CFP-Gen 0-based index), so predictions made elsewhere can be scored.

Example:
    >>> task = get_task("chebi20")
    >>> split = prepare_task(task, test_rows=300)
    >>> write_prepared(split.test, "data/chebi20.test.jsonl")
"""

from __future__ import annotations

import csv
import difflib
import gzip
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .assets import assets_dir
from .heads_io import default_file_mode

logger = logging.getLogger(__name__)

SPLIT_SEED = 20250609  # fixed, so that every user gets the same split of one-file tasks


class TaskError(ValueError):
    """An unknown task, or a data file that does not fit the task."""


@dataclass(frozen=True)
class Task:
    """One evaluation task: where its data lives, how a row becomes a prompt, and how it is scored."""

    name: str
    family: str  # code, math, summarization, molecules, proteins
    description: str
    id_field: str | None  # raw field holding the id; None means the 0-based row number
    prompt: Callable[[dict[str, Any]], str]  # the fixed prompt, filled from a raw row
    target: Callable[[dict[str, Any]], str]  # the gold completion that training targets
    train_file: str | None  # relative to the assets folder; None: no training split
    test_file: str
    max_new_tokens: int  # default generation budget (tokens)
    # Tasks with one file only: how many rows the test split takes by default.
    default_test_rows: int | None = None
    # Tasks whose splits come from an id range within one file (MBPP): {split: (first id, last id)}.
    id_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Raw fields every row needs; a file of another task fails on them with a clear message.
    required_fields: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Prompts. One fixed wording per task; the raw fields are inserted unchanged.


def _humaneval_prompt(row: dict[str, Any]) -> str:
    return "Complete the following Python function. Answer with the code only.\n\n" + row["prompt"]


def _mbpp_prompt(row: dict[str, Any]) -> str:
    tests = "\n".join(row["test_list"])
    return f"{row['text']}\nWrite a Python function that passes these tests:\n{tests}"


def _gsm8k_prompt(row: dict[str, Any]) -> str:
    return (
        "Solve the following math problem step by step. End with a line '#### ' followed by the "
        "number.\n\n" + row["question"]
    )


def _dialogsum_prompt(row: dict[str, Any]) -> str:
    return "Summarize the following dialogue in one or two sentences.\n\n" + row["dialogue"]


def _dialogsum_target(row: dict[str, Any]) -> str:
    return row.get("summary") or row["summary1"]


def _chebi20_prompt(row: dict[str, Any]) -> str:
    return "Write the SMILES string of the molecule described below.\n\n" + row["description"]


def _cfp_gen_prompt(row: dict[str, Any]) -> str:
    # CFP-Gen's instruction already ends with "The designed protein sequence is ".
    return row["instruction"].strip()


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            name="humaneval",
            required_fields=("task_id", "prompt", "test", "entry_point"),
            family="code",
            description="HumanEval: complete 164 Python functions; pass@k on the hidden tests. Test only.",
            id_field="task_id",
            prompt=_humaneval_prompt,
            target=lambda row: row["canonical_solution"],
            train_file=None,
            test_file="data/code/humaneval/HumanEval.jsonl.gz",
            max_new_tokens=512,
        ),
        Task(
            name="mbpp",
            required_fields=("task_id", "text", "test_list"),
            family="code",
            description="MBPP: write a Python function from a description and its tests; pass@k.",
            id_field="task_id",
            prompt=_mbpp_prompt,
            target=lambda row: row["code"],
            train_file="data/code/mbpp/mbpp.jsonl",
            test_file="data/code/mbpp/mbpp.jsonl",
            max_new_tokens=512,
            id_ranges={"test": (11, 510), "train": (601, 974)},
        ),
        Task(
            name="gsm8k",
            required_fields=("question", "answer"),
            family="math",
            description="GSM8K: grade-school word problems; numeric exact match of the final answer.",
            id_field=None,
            prompt=_gsm8k_prompt,
            target=lambda row: row["answer"],
            train_file="data/math/gsm8k/train.jsonl",
            test_file="data/math/gsm8k/test.jsonl",
            max_new_tokens=512,
        ),
        Task(
            name="dialogsum",
            required_fields=("fname", "dialogue"),
            family="summarization",
            description="DialogSum: summarise a dialogue; ROUGE-1/2/L against three references. "
            "Train: the dev file (500 rows); test: the test file (500 rows).",
            id_field="fname",
            prompt=_dialogsum_prompt,
            target=_dialogsum_target,
            train_file="data/summarization/dialogsum/dialogsum.dev.jsonl",
            test_file="data/summarization/dialogsum/dialogsum.test.jsonl",
            max_new_tokens=96,
        ),
        Task(
            name="chebi20",
            required_fields=("CID", "SMILES", "description"),
            family="molecules",
            description="ChEBI-20 text to SMILES: validity, exact match, fingerprint similarity. "
            "One file (3,301 rows), split into 300 test rows and the rest for training.",
            id_field="CID",
            prompt=_chebi20_prompt,
            target=lambda row: row["SMILES"],
            train_file="data/molecules/chebi20/validation.txt",
            test_file="data/molecules/chebi20/validation.txt",
            max_new_tokens=160,
            default_test_rows=300,
        ),
        Task(
            name="cfp-gen",
            required_fields=("instruction", "reference"),
            family="proteins",
            description="CFP-Gen function-guided protein design: alphabet, length, identity by global "
            "alignment. One file (260 rows), split into 100 test rows and 159 for training (a copy of a test row is dropped).",
            id_field=None,
            prompt=_cfp_gen_prompt,
            target=lambda row: row["reference"],
            train_file="data/proteins/cfp-gen/CFP-Gen.keyword-guided.json",
            test_file="data/proteins/cfp-gen/CFP-Gen.keyword-guided.json",
            max_new_tokens=400,
            default_test_rows=100,
        ),
    ]
}


def get_task(name: str) -> Task:
    """Return the preset called `name`, or raise TaskError listing the known tasks."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise TaskError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------
# Reading raw files


def read_raw_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a task file as published: JSONL (optionally .gz), a JSON list, or tab-separated text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if stem_suffix in (".txt", ".tsv"):
        lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
        rows = list(csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
        if rows and None in rows[0]:
            raise TaskError(f"{path}: line 2 has more columns than the header line")
        return rows
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}: not valid JSON ({error})") from error
        return _check_objects(rows, path)
    rows = []
    # Split at "\n" only, because JSON strings may contain U+2028, which str.splitlines() splits at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}:{number}: not a JSON line ({error})") from error
    return _check_objects(rows, path)


def _check_objects(rows: list[Any], path: Path) -> list[dict[str, Any]]:
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise TaskError(f"{path}: row {number} is a {type(row).__name__}, expected a JSON object")
    return rows


def is_prepared(rows: list[dict[str, Any]]) -> bool:
    """Return whether `rows` come from `prepare_task` (they contain `id`, `messages` and `reference`)."""
    return bool(rows) and all("reference" in row and "id" in row for row in rows)


def rows_with_ids(task: Task, rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Return copies of raw rows with the task's id added as a string `id`; duplicates are an error."""
    result = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        missing = [name for name in task.required_fields if name not in row]
        if missing:
            raise TaskError(
                f"{source}: row {index + 1} has no {', '.join(repr(name) for name in missing)} field, which task "
                f"{task.name!r} needs (the row's fields: {', '.join(sorted(row))}). Is this a {task.name} file?"
            )
        if task.id_field is None:
            row_id = str(index)
        elif task.id_field in row:
            row_id = str(row[task.id_field])
        else:
            raise TaskError(
                f"{source}: row {index + 1} has no {task.id_field!r} field, which task {task.name!r} uses as "
                f"its id (fields: {', '.join(sorted(row))}). Is this a {task.name} file?"
            )
        if row_id in seen:
            raise TaskError(f"{source}: id {row_id!r} appears twice; ids must be unique")
        seen.add(row_id)
        result.append({**row, "id": row_id})
    return result


def load_references(task: Task, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load the rows to score against: a prepared file, or the task's raw file in its published shape.

    Returns raw rows with a string `id`. Raises TaskError when the file is empty.
    """
    rows = read_raw_rows(path)
    if not rows:
        raise TaskError(f"{path}: the file has no rows, so there is nothing to evaluate")
    if is_prepared(rows):
        references = []
        for row in rows:
            if row.get("task", task.name) != task.name:
                raise TaskError(
                    f"{path}: rows were prepared for task {row['task']!r}, not {task.name!r}. Pass --task "
                    f"{row['task']}, or prepare the data with `caft tasks prepare {task.name}`"
                )
            references.append({**row["reference"], "id": str(row["id"])})
        return references
    return rows_with_ids(task, rows, str(path))


# ---------------------------------------------------------------------------------------------
# Preparing splits


@dataclass
class PreparedSplit:
    """Prepared rows of a task: training and test conversations, plus how many rows were dropped."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    dropped: dict[str, int]  # rows dropped per split for long prompts, and training copies of test rows


def _prepared_row(task: Task, row: dict[str, Any]) -> dict[str, Any]:
    reference = {key: value for key, value in row.items() if key != "id"}
    return {
        "id": row["id"],
        "task": task.name,
        "messages": [
            {"role": "user", "content": task.prompt(row)},
            {"role": "assistant", "content": task.target(row)},
        ],
        "reference": reference,
    }


def prepare_task(
    task: Task,
    test_rows: int | None = None,
    train_rows: int | None = None,
    max_prompt_chars: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> PreparedSplit:
    """Build the task's train and test conversations with its fixed prompt and split.

    `test_rows` / `train_rows` cut each split to its first rows after the fixed order (None keeps
    all). `max_prompt_chars` drops rows whose prompt is longer, before cutting, for small-context
    models. `data_dir` is the assets folder (default: `CAFT_ASSETS`, else ../shared).
    """
    for name, value in (("test_rows", test_rows), ("train_rows", train_rows), ("max_prompt_chars", max_prompt_chars)):
        if value is not None and value < 1:
            raise TaskError(f"{name} must be a positive number, got {value}")
    root = Path(data_dir) if data_dir is not None else assets_dir()
    test_path = root / task.test_file
    if not test_path.is_file():
        where = "--data-dir" if data_dir is not None else "CAFT_ASSETS (default ../shared)"
        raise FileNotFoundError(
            f"task {task.name!r} needs {test_path}, which is missing. Point {where} to the assets folder that "
            f"contains {task.test_file}"
        )
    test_all = rows_with_ids(task, read_raw_rows(test_path), str(test_path))
    if task.id_ranges:
        by_id = {int(row["id"]): row for row in test_all}
        ranges = task.id_ranges
        test_all = [by_id[i] for i in sorted(by_id) if ranges["test"][0] <= i <= ranges["test"][1]]
        train_all = [by_id[i] for i in sorted(by_id) if ranges["train"][0] <= i <= ranges["train"][1]]
    elif task.train_file == task.test_file:
        order = list(range(len(test_all)))
        random.Random(SPLIT_SEED).shuffle(order)
        cut = task.default_test_rows or len(order) // 10
        train_all = [test_all[i] for i in order[cut:]]
        test_all = [test_all[i] for i in order[:cut]]
    elif task.train_file is not None:
        train_path = root / task.train_file
        train_all = rows_with_ids(task, read_raw_rows(train_path), str(train_path))
    else:
        train_all = []

    # A training row identical to a test row (same prompt and answer) would leak the test answer.
    # CFP-Gen lists one protein twice, so its fixed split drops that copy from training.
    test_pairs = {(task.prompt(row), task.target(row)) for row in test_all}
    duplicates = [row for row in train_all if (task.prompt(row), task.target(row)) in test_pairs]
    if duplicates:
        logger.debug("%s: %d training rows equal a test row and are dropped", task.name, len(duplicates))
        train_all = [row for row in train_all if (task.prompt(row), task.target(row)) not in test_pairs]

    dropped = {"train_duplicates_of_test": len(duplicates)}
    splits = {}
    for name, rows, limit in (("train", train_all, train_rows), ("test", test_all, test_rows)):
        kept = rows
        if max_prompt_chars is not None:
            kept = [row for row in rows if len(task.prompt(row)) <= max_prompt_chars]
        dropped[name] = len(rows) - len(kept)
        if limit is not None:
            if limit > len(kept) and rows:
                logger.warning("%s: %d %s rows requested, only %d available", task.name, limit, name, len(kept))
            kept = kept[:limit]
        splits[name] = [_prepared_row(task, row) for row in kept]
    if not splits["test"]:
        raise TaskError(
            f"task {task.name!r}: the test split is empty"
            + (
                f" after dropping prompts over {max_prompt_chars} characters. Raise max_prompt_chars"
                if max_prompt_chars
                else ""
            )
        )
    return PreparedSplit(train=splits["train"], test=splits["test"], dropped=dropped)


def write_jsonl(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows as JSONL through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(handle.name, default_file_mode())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path

