"""Task presets, `caft score` input checks, and the paired bootstrap of `caft compare`."""

import json

import numpy as np
import pytest

from caft.cli import main
from caft.scoring.base import ScoringError
from caft.scoring.run import align_predictions, read_predictions, score_file
from caft.stats import paired_bootstrap
from caft.tasks import TASKS, TaskError, get_task, load_references, prepare_task, write_jsonl

# Ids as each task defines them, and split sizes, from the published files.
EXPECTED = {
    "humaneval": ("HumanEval/0", 0, 164),
    "mbpp": ("11", 374, 500),
    "gsm8k": ("0", 7473, 1319),
    "dialogsum": ("test_0", 500, 500),
    "chebi20": (None, 3001, 300),
    "cfp-gen": (None, 159, 100),  # one training copy of a test row dropped
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_presets_split_real_files(assets, name):
    first_id, train_rows, test_rows = EXPECTED[name]
    split = prepare_task(get_task(name))
    assert (len(split.train), len(split.test)) == (train_rows, test_rows)
    if first_id is not None:
        assert split.test[0]["id"] == first_id
    test_ids = [row["id"] for row in split.test]
    assert len(set(test_ids)) == len(test_ids)
    # GSM8K numbers the lines of each file from 0, so ids repeat across files: compare the rows'
    # prompt and answer instead (CFP-Gen repeats prompts with other reference proteins).
    def pairs(rows):
        return {(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows}

    assert not pairs(split.train) & pairs(split.test), "train and test splits overlap"
    row = split.test[0]
    assert [message["role"] for message in row["messages"]] == ["user", "assistant"]
    assert row["messages"][0]["content"] and row["messages"][1]["content"]


def test_one_file_split_is_fixed(assets):
    first = prepare_task(get_task("chebi20"))
    second = prepare_task(get_task("chebi20"))
    assert [row["id"] for row in first.test] == [row["id"] for row in second.test]
    assert first.test[0]["reference"]["CID"] == first.test[0]["id"]


def test_max_prompt_chars_drops_long_rows(assets):
    split = prepare_task(get_task("dialogsum"), max_prompt_chars=700)
    assert split.dropped == {"train_duplicates_of_test": 0, "train": 251, "test": 267}
    assert all(len(row["messages"][0]["content"]) <= 700 for row in split.test)


def test_unknown_task_is_named_with_a_suggestion():
    with pytest.raises(TaskError, match=r"unknown task 'chebi'.*'chebi20'"):
        get_task("chebi")


def test_empty_test_set_is_an_error(assets, tmp_path):
    with pytest.raises(TaskError, match="test split is empty"):
        prepare_task(get_task("cfp-gen"), max_prompt_chars=10)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TaskError, match="no rows"):
        load_references(get_task("gsm8k"), empty)


def test_raw_file_of_another_task_is_named(assets, tmp_path):
    with pytest.raises(TaskError, match=r"has no 'fname', 'dialogue' field.*dialogsum file"):
        load_references(get_task("dialogsum"), assets / "data/math/gsm8k/test.jsonl")


def _gsm8k_files(assets, tmp_path, rows=5):
    test = prepare_task(get_task("gsm8k"), test_rows=rows).test
    data = write_jsonl(test, tmp_path / "test.jsonl")
    return test, data


def _write_predictions(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_score_gold_answers_cli(assets, tmp_path, capsys):
    test, data = _gsm8k_files(assets, tmp_path)
    predictions = _write_predictions(
        tmp_path / "p.jsonl", [{"id": row["id"], "completion": row["messages"][1]["content"]} for row in test]
    )
    output = tmp_path / "scores.json"
    status = main(["score", "--task", "gsm8k", "--data", str(data), "--predictions", str(predictions),
                   "--output", str(output)])
    assert status == 0
    report = json.loads(output.read_text())
    assert report["accuracy"] == 1.0
    assert [sample["id"] for sample in report["samples"]] == [row["id"] for row in test]
    assert "accuracy" in capsys.readouterr().out


def test_score_raw_file_uses_line_numbers_as_ids(assets, tmp_path):
    raw = assets / "data/math/gsm8k/test.jsonl"
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    predictions = _write_predictions(
        tmp_path / "p.jsonl", [{"id": index, "completion": row["answer"]} for index, row in enumerate(rows)]
    )
    assert score_file("gsm8k", raw, predictions).metrics["accuracy"] == 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rows: rows + [{"id": "9999", "completion": "1"}], r"1 ids are not in the test data: '9999'"),
        (lambda rows: rows[:-1], r"1 test ids have no prediction: '4'"),
        (lambda rows: rows + [rows[0]], r"p.jsonl:6: id '0' already appeared on line 1"),
    ],
    ids=["unknown", "missing", "duplicate"],
)
def test_bad_prediction_ids(assets, tmp_path, capsys, change, message):
    test, data = _gsm8k_files(assets, tmp_path)
    rows = change([{"id": row["id"], "completion": "1"} for row in test])
    predictions = _write_predictions(tmp_path / "p.jsonl", rows)
    with pytest.raises(ScoringError, match=message):
        score_file("gsm8k", data, predictions)
    status = main(["score", "--task", "gsm8k", "--data", str(data), "--predictions", str(predictions),
                   "--output", str(tmp_path / "out.json")])
    assert status == 2
    assert "caft: error:" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_unknown_task_cli(tmp_path, capsys):
    status = main(["score", "--task", "nope", "--data", "x", "--predictions", "y", "--output", str(tmp_path / "o")])
    assert status == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_predictions_file_problems_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "completion": "a"}\nnot json\n')
    with pytest.raises(ScoringError, match=r"bad.jsonl:2: not a JSON line"):
        read_predictions(bad)
    bad.write_text('{"id": 1}\n')
    with pytest.raises(ScoringError, match=r"bad.jsonl:1: row has no \"completion\""):
        read_predictions(bad)
    bad.write_text("")
    with pytest.raises(ScoringError, match="empty"):
        read_predictions(bad)


def test_several_samples_per_id_align(tmp_path):
    path = _write_predictions(tmp_path / "p.jsonl", [{"id": "b", "completions": ["1", "2"]}, {"id": "a", "completion": "3"}])
    aligned = align_predictions([{"id": "a"}, {"id": "b"}], read_predictions(path))
    assert aligned == [["3"], ["1", "2"]]


# ---------------------------------------------------------------------------------------------
# Paired bootstrap


def test_bootstrap_of_a_constant_shift_is_exact():
    rng = np.random.default_rng(0)
    control = rng.random((5, 40))
    result = paired_bootstrap(control + 0.1, control, samples=500)
    assert result.mean == pytest.approx(0.1)
    assert result.low == pytest.approx(0.1)
    assert result.high == pytest.approx(0.1)
    assert result.significant
    assert result.resampled == "seeds and rows"


def test_bootstrap_of_identical_methods_is_not_significant():
    rng = np.random.default_rng(1)
    # Two methods with the same distribution: the interval must contain 0.
    treatment, control = rng.random((5, 300)), rng.random((5, 300))
    result = paired_bootstrap(treatment, control, samples=1000)
    assert result.low < 0 < result.high
    assert not result.significant


def test_bootstrap_interval_matches_the_normal_approximation():
    # Per-seed values only: the bootstrap interval of a mean of 200 seeds is close to mean +- 1.96 sd/sqrt(n).
    rng = np.random.default_rng(2)
    difference = rng.normal(0.3, 1.0, size=200)
    result = paired_bootstrap(difference, np.zeros(200), samples=4000)
    half_width = 1.96 * difference.std(ddof=1) / np.sqrt(200)
    assert result.low == pytest.approx(difference.mean() - half_width, abs=0.03)
    assert result.high == pytest.approx(difference.mean() + half_width, abs=0.03)
    assert result.resampled == "seeds"


def test_bootstrap_rejects_unpaired_shapes():
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)))


def test_wrong_raw_file_names_fields(assets):
    with pytest.raises(TaskError, match=r"test.jsonl: row 1 has no 'instruction', 'reference' field.*cfp-gen file"):
        load_references(get_task("cfp-gen"), assets / "data/math/gsm8k/test.jsonl")


def test_prepared_file_of_another_task_names_the_fix(assets, tmp_path):
    data = write_jsonl(prepare_task(get_task("chebi20"), test_rows=2).test, tmp_path / "chebi.jsonl")
    with pytest.raises(TaskError, match=r"prepared for task 'chebi20', not 'gsm8k'. Pass --task chebi20"):
        load_references(get_task("gsm8k"), data)


@pytest.mark.parametrize("option", ["test_rows", "train_rows", "max_prompt_chars"])
def test_non_positive_sizes_are_rejected(assets, option):
    with pytest.raises(TaskError, match=f"{option} must be a positive number, got -1"):
        prepare_task(get_task("gsm8k"), **{option: -1})


def test_line_separator_inside_json_string(tmp_path):
    # U+2028 is valid unescaped inside a JSON string; GSM8K's training file contains one.
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "a\u2028b", "answer": "#### 1"}\n{"question": "c", "answer": "#### 2"}\n')
    rows = load_references(get_task("gsm8k"), path)
    assert [row["question"] for row in rows] == ["a\u2028b", "c"]


def test_prepared_gsm8k_trains(assets, tmp_path):
    from caft.data import load_conversations

    path = write_jsonl(prepare_task(get_task("gsm8k")).train, tmp_path / "gsm8k.train.jsonl")
    assert len(load_conversations(path)) == 7473


def test_output_folder_is_rejected_before_writing(assets, tmp_path, capsys):
    test, data = _gsm8k_files(assets, tmp_path)
    predictions = _write_predictions(tmp_path / "p.jsonl", [{"id": row["id"], "completion": "1"} for row in test])
    folder = tmp_path / "out"
    folder.mkdir()
    status = main(["score", "--task", "gsm8k", "--data", str(data), "--predictions", str(predictions),
                   "--output", str(folder)])
    assert status == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == []
    assert not list(tmp_path.glob(".*.tmp"))


def test_eval_with_missing_model_is_one_line(assets, tmp_path, capsys):
    test, data = _gsm8k_files(assets, tmp_path)
    status = main(["eval", "--model", str(tmp_path / "nothere"), "--task", "gsm8k", "--data", str(data),
                   "--output", str(tmp_path / "e.json")])
    assert status == 2
    assert "model folder not found" in capsys.readouterr().err
