"""Tests for caft.scoring.code: HumanEval and MBPP pass@k, program assembly and the execution guard.

The sanity tests run the real HumanEval and MBPP reference solutions from the shared assets folder
(CAFT_ASSETS, default ../shared) and skip when it is missing. The guard tests run small programs that
try to write or delete files in a pytest tmp_path folder outside the sandbox directory, or open a
socket to 127.0.0.1. No test contacts another host.
"""

import gzip
import itertools
import json
import socket
import time
from math import comb
from pathlib import Path

import pytest

from caft.scoring.base import ScoringError
from caft.scoring.code import (
    build_humaneval_program,
    pass_at_k,
    run_program,
    score_humaneval,
    score_mbpp,
    strip_markdown_fence,
)

ADD_PROBLEM = {
    "id": "toy/add",
    "task_id": "toy/add",
    "prompt": 'import math\n\n\ndef add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}


def load_humaneval(assets: Path) -> list[dict]:
    path = assets / "data" / "code" / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found: set CAFT_ASSETS to the shared assets folder")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [{**row, "id": row["task_id"]} for row in rows]


def load_mbpp(assets: Path) -> list[dict]:
    path = assets / "data" / "code" / "mbpp" / "mbpp.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found: set CAFT_ASSETS to the shared assets folder")
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [{**row, "id": str(row["task_id"])} for row in rows]


def unused_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- pass@k estimator ---


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them passing) that contain a passing sample."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = brute_force_pass_at_k(n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(200, 100) is about 9e58, so compare the product form with exact integer arithmetic.
    exact = 1 - comb(200 - 37, 100) / comb(200, 100)
    assert pass_at_k(200, 37, 100) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(200, 200, 1) == 1.0


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(3, 1, 5)


# --- program assembly ---


def test_strip_markdown_fence_variants():
    assert strip_markdown_fence("```python\nx = 1\n```\nSome prose.") == "x = 1\n"
    assert strip_markdown_fence("Here:\n```\nx = 1\n```") == "x = 1\n"
    assert strip_markdown_fence("```py\nx = 1\n") == "x = 1\n"  # cut off before the closing fence
    assert strip_markdown_fence("    return 1\n") == "    return 1\n"


def test_humaneval_program_whole_function_keeps_header():
    completion = "```python\ndef add(a, b):\n    return math.fsum([a, b])\n```"
    program = build_humaneval_program(ADD_PROBLEM, completion)
    assert program.startswith("import math\n")
    assert program.count("def add(") == 1
    assert program.rstrip().endswith("check(add)")


def test_humaneval_program_body_completion_appends_to_prompt():
    program = build_humaneval_program(ADD_PROBLEM, "    return a + b\n")
    assert program.startswith(ADD_PROBLEM["prompt"] + "    return a + b\n")


# --- HumanEval and MBPP scoring ---


def test_humaneval_toy_completion_styles_pass():
    completions = [
        [
            "    return a + b\n",
            "```python\n    return a + b\n```",
            "def add(a, b):\n    return a + b\n",
            "Here is the function:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\n",
            "    return a - b\n",
        ]
    ]
    result = score_humaneval([ADD_PROBLEM], completions, k_values=(1, 5, 10))
    sample = result.samples[0]
    assert sample["results"] == ["passed", "passed", "passed", "passed", "failed"]
    assert sample["reasons"][4].startswith("AssertionError")
    assert sample["num_passed"] == 4
    assert sample["n"] == 5
    assert result.metrics["pass@1"] == pytest.approx(0.8)
    assert result.metrics["pass@5"] == 1.0
    assert "pass@10" not in result.metrics  # k > n is not reported
    assert result.per_sample_metrics == {"pass@1": "pass@1", "pass@5": "pass@5"}


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass(assets):
    rows = load_humaneval(assets)
    assert len(rows) == 164
    completions = [[row["canonical_solution"]] for row in rows]
    result = score_humaneval(rows, completions, workers=2)
    failures = {s["id"]: s["reasons"][0] for s in result.samples if s["num_passed"] != 1}
    assert failures == {}
    assert result.metrics["pass@1"] == 1.0
    assert set(result.metrics) == {"pass@1"}


@pytest.mark.slow
def test_humaneval_pass_body_scores_zero(assets):
    rows = load_humaneval(assets)
    result = score_humaneval(rows, [["    pass\n"] for _ in rows], workers=2)
    passing = [s["id"] for s in result.samples if s["num_passed"]]
    assert passing == []
    assert result.metrics["pass@1"] == 0.0


def test_mbpp_reference_code_passes(assets):
    rows = {row["id"]: row for row in load_mbpp(assets)}
    chosen = [rows[task_id] for task_id in ("11", "12", "17", "100", "300", "510")]
    result = score_mbpp(chosen, [[row["code"]] for row in chosen])
    failures = {s["id"]: s["reasons"][0] for s in result.samples if s["num_passed"] != 1}
    assert failures == {}
    assert result.metrics["pass@1"] == 1.0


def test_mbpp_wrong_and_fenced_solutions(assets):
    rows = {row["id"]: row for row in load_mbpp(assets)}
    row = rows["17"]  # square_perimeter(a) == 4 * a
    completions = [[
        "def square_perimeter(a):\n    return 2 * a\n",
        "```python\ndef square_perimeter(a):\n    return 4 * a\n```",
    ]]
    result = score_mbpp([row], completions, k_values=(1,))
    assert result.samples[0]["results"] == ["failed", "passed"]
    assert result.metrics["pass@1"] == 0.5


# --- execution limits and guard ---


def test_infinite_loop_times_out():
    completion = "    while True:\n        pass\n"
    start = time.monotonic()
    result = score_humaneval([ADD_PROBLEM], [[completion]], k_values=(1,), timeout_s=2.0)
    elapsed = time.monotonic() - start
    assert result.samples[0]["results"] == ["timeout"]
    assert result.metrics["pass@1"] == 0.0
    assert elapsed < 10


def test_sleeping_program_times_out():
    status, reason = run_program("import time\ntime.sleep(60)\n", timeout_s=1.0, memory_mb=256)
    assert status == "timeout"
    assert "1 s" in reason


def test_write_outside_workdir_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    completion = f"    open({str(target)!r}, 'w').write('x')\n    return a + b\n"
    result = score_humaneval([ADD_PROBLEM], [[completion]], k_values=(1,))
    assert result.samples[0]["results"] == ["error"]
    assert "PermissionError" in result.samples[0]["reasons"][0]
    assert result.metrics["pass@1"] == 0.0
    assert not target.exists()


@pytest.mark.parametrize(
    "statement",
    [
        "import os; os.remove({path!r})",
        "import os; os.unlink({path!r})",
        "import os; os.rename({path!r}, 'moved.txt')",
        "import shutil; shutil.rmtree({folder!r})",
        "import os; os.open({path!r}, os.O_WRONLY | os.O_TRUNC)",
        "import pathlib; pathlib.Path({path!r}).write_text('overwritten')",
    ],
)
def test_changing_file_outside_is_blocked(tmp_path, statement):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    status, reason = run_program(
        statement.format(path=str(victim), folder=str(tmp_path)), timeout_s=10.0, memory_mb=512
    )
    assert status == "error"
    assert "PermissionError" in reason
    assert victim.read_text() == "keep"


def test_symlink_escape_is_blocked(tmp_path):
    program = f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/new.txt', 'w').write('x')\n"
    status, reason = run_program(program, timeout_s=10.0, memory_mb=512)
    assert status == "error"
    assert "PermissionError" in reason
    assert not (tmp_path / "new.txt").exists()


def test_files_inside_workdir_are_allowed():
    program = (
        "import os, shutil, tempfile\n"
        "os.makedirs('a/b')\n"
        "open('a/b/f.txt', 'w').write('x')\n"
        "os.rename('a/b/f.txt', 'a/g.txt')\n"
        "shutil.rmtree('a')\n"
        "with tempfile.NamedTemporaryFile() as handle:\n"
        "    handle.write(b'x')\n"
    )
    assert run_program(program, timeout_s=10.0, memory_mb=512) == ("passed", "")


def test_socket_connect_is_blocked():
    port = unused_loopback_port()
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
    status, reason = run_program(program, timeout_s=10.0, memory_mb=512)
    assert status == "error"
    assert "network access" in reason


def test_socket_creation_is_blocked():
    status, reason = run_program("import socket\nsocket.socket()\n", timeout_s=10.0, memory_mb=512)
    assert status == "error"
    assert "socket.__new__" in reason


@pytest.mark.parametrize(
    "program",
    [
        "import os\nos.system('true')\n",
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.fork()\n",
    ],
)
def test_process_creation_is_blocked(program):
    status, reason = run_program(program, timeout_s=10.0, memory_mb=512)
    assert status == "error"
    assert "process creation" in reason


def test_memory_limit_stops_large_allocation():
    completion = "    block = bytearray(2 * 1024 ** 3)\n    return a + b\n"
    result = score_humaneval([ADD_PROBLEM], [[completion]], k_values=(1,), memory_mb=256)
    assert result.samples[0]["results"] == ["error"]
    assert "MemoryError" in result.samples[0]["reasons"][0]


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    program = (
        "import os\n"
        "assert 'HTTPS_PROXY' not in os.environ\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
    )
    assert run_program(program, timeout_s=10.0, memory_mb=512) == ("passed", "")


# --- bad inputs ---


def test_missing_field_names_id():
    row = {key: value for key, value in ADD_PROBLEM.items() if key != "entry_point"}
    with pytest.raises(ScoringError, match="toy/add.*entry_point"):
        score_humaneval([row], [["    return a + b\n"]])


def test_missing_id_names_row_index():
    row = {key: value for key, value in ADD_PROBLEM.items() if key != "id"}
    with pytest.raises(ScoringError, match="row 0"):
        score_humaneval([row], [["    return a + b\n"]])


def test_empty_completion_list_names_id():
    with pytest.raises(ScoringError, match="toy/add"):
        score_humaneval([ADD_PROBLEM], [[]])


def test_bare_string_completion_names_id():
    with pytest.raises(ScoringError, match="'7'"):
        score_mbpp([{"id": "7", "test_list": ["assert True"]}], ["def f(): pass"])


def test_length_mismatch_is_rejected():
    with pytest.raises(ScoringError, match="1 references but 2"):
        score_humaneval([ADD_PROBLEM], [["    return a + b\n"], ["    return a + b\n"]])


def test_k_values_above_n_are_rejected():
    with pytest.raises(ScoringError, match="sample more completions"):
        score_humaneval([ADD_PROBLEM], [["    return a + b\n"]], k_values=(10,))
