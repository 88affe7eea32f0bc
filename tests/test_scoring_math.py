"""Tests for caft.scoring.math_answers: final-answer extraction, number parsing and GSM8K accuracy.

The gold-answer test reads GSM8K from the shared assets folder (CAFT_ASSETS, default ../shared) and
skips when it is missing.
"""

import json
from fractions import Fraction
from pathlib import Path

import pytest

from caft.scoring.base import ScoringError
from caft.scoring.math_answers import extract_answer, normalize_number, score_gsm8k


def load_gsm8k(assets: Path, split: str) -> list[dict]:
    path = assets / "data" / "math" / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found: set CAFT_ASSETS to the shared assets folder")
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [{**row, "id": f"{split}-{index}"} for index, row in enumerate(rows)]


def row(row_id: str, gold: str) -> dict:
    return {"id": row_id, "question": "?", "answer": f"Some steps.\n#### {gold}"}


EXTRACTION_CASES = [
    # (completion, expected value)
    ("$1,234.50", Fraction("1234.5")),
    ("18 dollars.", Fraction(18)),
    ("\\boxed{\\frac{3}{4}}", Fraction(3, 4)),
    ("\\boxed{\\dfrac{3}{4}}", Fraction(3, 4)),
    ("\\boxed{12}", Fraction(12)),
    ("The answer is 7.", Fraction(7)),
    ("-3", Fraction(-3)),
    ("50%", Fraction(50)),
    ("She pays 3 + 4 = 7 dollars, so the answer is $7.", Fraction(7)),
    ("Answer: 1,000,000", Fraction(1000000)),
    ("First 12 then 15.\n#### 15", Fraction(15)),
    ("#### 1,234", Fraction(1234)),
    ("So 10 - 3 = 7 apples remain.", Fraction(7)),
    ("The temperature is -5 degrees.", Fraction(-5)),
    ("It is 5 cm long.", Fraction(5)),
    ("€20", Fraction(20)),
    ("£0.25", Fraction(1, 4)),
    ("3/4 of a cup", Fraction(3, 4)),
    ("\\boxed{1\\,000}", Fraction(1000)),
    ("\\boxed{12\\text{ cm}}", Fraction(12)),
    ("\\boxed{\\text{\\$}1{,}000}", Fraction(1000)),  # nested braces inside \boxed
    ("\\boxed{\\left(\\frac{1}{2}\\right)}", Fraction(1, 2)),
    ("We get \\boxed{3} first, then correct it: \\boxed{5}.", Fraction(5)),  # last \boxed wins
    ("\\boxed{18} and then 99 more words 7", Fraction(18)),  # \boxed beats a later number
    ("The answer is 4.\n#### 6", Fraction(6)),  # "####" beats other forms
    ("Total: $\\dfrac{1}{2}$", Fraction(1, 2)),
    ("0.5", Fraction(1, 2)),
]


@pytest.mark.parametrize("completion, expected", EXTRACTION_CASES)
def test_extract_answer_table(completion, expected):
    answer = extract_answer(completion)
    assert answer is not None
    assert normalize_number(answer) == expected


def test_extract_answer_without_number():
    assert extract_answer("I do not know.") is None
    assert extract_answer("") is None


def test_normalize_number_rejects_text_and_zero_denominator():
    assert normalize_number(None) is None
    assert normalize_number("no digits here") is None
    assert normalize_number("3/0") is None


def test_score_gsm8k_accuracy_and_samples():
    references = [row("a", "18"), row("b", "1,000"), row("c", "-4")]
    completions = [
        ["9 * 2 = 18, so she makes $18.", "The answer is 16."],
        ["#### 1000"],
        ["\\boxed{4}"],
    ]
    result = score_gsm8k(references, completions)
    assert result.samples[0]["correct"] == [True, False]
    assert result.samples[0]["accuracy"] == 0.5
    assert result.samples[0]["predicted"] == ["18", "16."]
    assert result.samples[0]["gold"] == "18"
    assert result.samples[1]["correct"] == [True]
    assert result.samples[2]["correct"] == [False]
    assert result.metrics["accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert result.per_sample_metrics == {"accuracy": "accuracy"}


def test_gsm8k_gold_answers_score_one(assets):
    rows = load_gsm8k(assets, "test")
    assert len(rows) == 1319
    result = score_gsm8k(rows, [[reference["answer"]] for reference in rows])
    wrong = [sample["id"] for sample in result.samples if sample["accuracy"] != 1.0]
    assert wrong == []
    assert result.metrics["accuracy"] == 1.0


def test_gsm8k_shifted_answers_score_zero(assets):
    rows = load_gsm8k(assets, "test")[:200]
    golds = [reference["answer"].rsplit("####", 1)[1].strip().replace(",", "") for reference in rows]
    completions = [[f"The answer is {int(gold) + 1}."] for gold in golds]
    result = score_gsm8k(rows, completions)
    assert result.metrics["accuracy"] == 0.0


def test_gsm8k_train_gold_answers_parse(assets):
    rows = load_gsm8k(assets, "train")
    result = score_gsm8k(rows, [[reference["answer"]] for reference in rows])
    assert result.metrics["accuracy"] == 1.0


def test_missing_answer_names_id():
    with pytest.raises(ScoringError, match="'q-7'.*####"):
        score_gsm8k([{"id": "q-7", "question": "?", "answer": "no marker"}], [["5"]])


def test_non_numeric_gold_names_id():
    with pytest.raises(ScoringError, match="'q-8'.*not a number"):
        score_gsm8k([row("q-8", "many")], [["5"]])


def test_missing_id_names_row_index():
    with pytest.raises(ScoringError, match="row 0"):
        score_gsm8k([{"question": "?", "answer": "#### 5"}], [["5"]])


def test_bad_completions_name_id():
    with pytest.raises(ScoringError, match="'a'"):
        score_gsm8k([row("a", "5")], [[]])
    with pytest.raises(ScoringError, match="'a'"):
        score_gsm8k([row("a", "5")], ["5"])
    with pytest.raises(ScoringError, match="'a'.*int"):
        score_gsm8k([row("a", "5")], [[5]])


def test_length_mismatch_is_rejected():
    with pytest.raises(ScoringError, match="1 references but 0"):
        score_gsm8k([row("a", "5")], [])
