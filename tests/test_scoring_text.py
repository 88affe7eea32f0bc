"""ROUGE scoring of DialogSum summaries, on hand cases and real DialogSum rows."""

import json

import pytest

from caft.scoring.base import ScoringError
from caft.scoring.summarization import score_dialogsum

ROUGE = ("rouge1", "rouge2", "rougeL")


def _read_jsonl(path, limit):
    if not path.is_file():
        pytest.skip(f"DialogSum file not found at {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            row["id"] = row["fname"]
            rows.append(row)
            if len(rows) == limit:
                break
    return rows


@pytest.fixture(scope="module")
def test_rows(assets):
    return _read_jsonl(assets / "data" / "summarization" / "dialogsum" / "dialogsum.test.jsonl", 20)


@pytest.fixture(scope="module")
def dev_rows(assets):
    return _read_jsonl(assets / "data" / "summarization" / "dialogsum" / "dialogsum.dev.jsonl", 20)


def test_summary_against_itself_scores_one():
    row = {"id": "a", "summary": "#Person1# books a table for two at seven."}
    result = score_dialogsum([row], [[row["summary"]]])
    for name in ROUGE:
        assert result.metrics[name] == pytest.approx(1.0)
        assert result.samples[0][name] == pytest.approx(1.0)


def test_disjoint_summary_scores_zero():
    row = {"id": "a", "summary": "#Person1# books a table for two at seven."}
    result = score_dialogsum([row], [["Quantum chromodynamics explains gluons."]])
    for name in ROUGE:
        assert result.metrics[name] == pytest.approx(0.0)


def test_partial_overlap_between_zero_and_one():
    row = {"id": "a", "summary": "the cat sat on the mat"}
    result = score_dialogsum([row], [["the cat sat on a sofa"]])
    # Unigrams: 4 of 6 shared on each side ("the", "cat", "sat", "on"), so F1 = 4/6.
    assert result.metrics["rouge1"] == pytest.approx(4 / 6)
    # Bigrams: "the cat", "cat sat", "sat on" are shared, 3 of 5 on each side.
    assert result.metrics["rouge2"] == pytest.approx(3 / 5)


def test_multi_reference_takes_maximum():
    row = {
        "id": "t",
        "summary1": "Alice asks Bob to water the plants.",
        "summary2": "Tom and Mary argue about the rent for their flat.",
        "summary3": "A customer returns a broken phone.",
    }
    result = score_dialogsum([row], [[row["summary2"]]])
    for name in ROUGE:
        assert result.metrics[name] == pytest.approx(1.0)


def test_empty_reference_fields_are_skipped():
    row = {"id": "t", "summary": "", "summary1": "  ", "summary2": "Bob fixes the sink."}
    result = score_dialogsum([row], [["Bob fixes the sink."]])
    assert result.metrics["rougeL"] == pytest.approx(1.0)


def test_completions_averaged_then_rows():
    rows = [{"id": "a", "summary": "red green blue"}, {"id": "b", "summary": "one two three"}]
    completions = [["red green blue", "nothing here"], ["one two three"]]
    result = score_dialogsum(rows, completions)
    assert result.samples[0]["rouge1"] == pytest.approx(0.5)
    assert result.samples[1]["rouge1"] == pytest.approx(1.0)
    assert result.metrics["rouge1"] == pytest.approx(0.75)
    assert len(result.samples[0]["completions"]) == 2


def test_mean_length_in_words():
    rows = [{"id": "a", "summary": "x"}, {"id": "b", "summary": "y"}]
    result = score_dialogsum(rows, [["one two", "one two three four"], ["a b c d e f"]])
    # Row means are 3 and 6 words.
    assert result.metrics["mean_length_words"] == pytest.approx(4.5)


def test_per_sample_metrics_name_sample_keys():
    row = {"id": "a", "summary": "Bob fixes the sink."}
    result = score_dialogsum([row], [["Bob fixes it."]])
    assert set(result.per_sample_metrics) == set(ROUGE)
    for headline, key in result.per_sample_metrics.items():
        assert result.samples[0][key] == pytest.approx(result.metrics[headline])
    assert result.samples[0]["id"] == "a"


def test_real_test_rows_each_reference_scores_one(test_rows):
    for field in ("summary1", "summary2", "summary3"):
        completions = [[row[field]] for row in test_rows]
        result = score_dialogsum(test_rows, completions)
        for name in ROUGE:
            assert result.metrics[name] == pytest.approx(1.0), (field, name)


def test_real_dev_rows_against_itself(dev_rows):
    result = score_dialogsum(dev_rows, [[row["summary"]] for row in dev_rows])
    for name in ROUGE:
        assert result.metrics[name] == pytest.approx(1.0)
    assert len(result.samples) == len(dev_rows)


def test_real_rows_shifted_summaries_score_low(test_rows):
    # Each row gets the next row's summary: unrelated dialogues share only common words.
    shifted = [[test_rows[(index + 1) % len(test_rows)]["summary1"]] for index in range(len(test_rows))]
    result = score_dialogsum(test_rows, shifted)
    assert 0.0 < result.metrics["rouge1"] < 0.5
    assert result.metrics["rouge2"] < 0.2


def test_row_without_summary_raises_naming_id():
    with pytest.raises(ScoringError, match="dev_7"):
        score_dialogsum([{"id": "dev_7", "dialogue": "#Person1#: Hi."}], [["Hi."]])


def test_length_mismatch_raises():
    rows = [{"id": "a", "summary": "x"}, {"id": "b", "summary": "y"}]
    with pytest.raises(ScoringError, match="2 reference rows but 1"):
        score_dialogsum(rows, [["x"]])


def test_bare_string_completions_raise():
    with pytest.raises(ScoringError, match="list of strings"):
        score_dialogsum([{"id": "a", "summary": "x"}], ["x"])


def test_empty_completion_list_raises():
    with pytest.raises(ScoringError, match="'a' has no completions"):
        score_dialogsum([{"id": "a", "summary": "x"}], [[]])


def test_row_without_id_raises():
    with pytest.raises(ScoringError, match="no 'id' key"):
        score_dialogsum([{"summary": "x"}], [["x"]])
