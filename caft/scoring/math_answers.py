"""Extract a final numeric answer from a math solution and score GSM8K by exact numeric match.

Models state the final answer in several styles: GSM8K's own "#### 18", LaTeX "\\boxed{18}",
"The answer is $18." or just a last number in the text. Answers are compared as exact fractions,
so "18.00", "$18" and "18 dollars" all equal the gold "18", and no float tolerance is needed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from .base import ScoreResult, ScoringError

logger = logging.getLogger(__name__)

# A number is digits with optional comma thousands separators, decimals and exponent, or a bare decimal
# like ".5". A minus sign counts only when no word character precedes it, so "5-3" is two numbers.
_SIGN = r"(?:(?<![\w)])-)?"
_NUMBER = rf"{_SIGN}(?:(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+)"
# A number, optionally followed by "/ number" (a plain fraction such as "3/4").
_NUMBER_OR_FRACTION = re.compile(rf"(?P<numerator>{_NUMBER})(?:\s*/\s*(?P<denominator>{_NUMBER}))?")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:|=)\s*(?P<answer>[^\n]*)", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# \text{...}-style commands whose argument is kept as plain text.
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
# LaTeX spacing commands and other characters that never change a number's value.
_IGNORED = re.compile(r"\\[,;:! ]|\\quad|\\qquad|\\left|\\right|\\\$|\\%|[$€£¥%~]")


def _boxed_contents(text: str) -> list[str]:
    """Return the argument of every \\boxed{...} in `text`, matching nested braces."""
    contents = []
    for match in _BOXED.finditer(text):
        depth = 1
        position = match.end()
        while position < len(text) and depth:
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
            position += 1
        if depth == 0:
            contents.append(text[match.end() : position - 1])
    return contents


def _simplify_latex(text: str) -> str:
    """Rewrite LaTeX numbers as plain text: "\\frac{3}{4}" -> "3/4", "1{,}000" -> "1,000", "\\$5" -> "5"."""
    cleaned = text.replace("{,}", ",").replace("\u2212", "-")  # U+2212 is the minus sign
    cleaned = _TEXT_COMMAND.sub(r" \1 ", cleaned)
    cleaned = _LATEX_FRACTION.sub(r"(\1)/(\2)", cleaned)
    cleaned = _IGNORED.sub("", cleaned)
    # Drop the brackets a \frac left around plain numbers: "(3)/(4)" -> "3/4".
    return re.sub(rf"\(\s*({_NUMBER})\s*\)", r"\1", cleaned)


def normalize_number(text: str | None) -> Fraction | None:
    """Parse the first number in `text` as an exact Fraction, or return None if it has none.

    Accepts thousands separators ("1,000", LaTeX "1{,}000"), currency and percent signs (which
    are dropped, so "50%" is 50), units after the number ("18 dollars"), a trailing period,
    negative numbers, decimals, plain fractions ("3/4"), \\frac, \\dfrac and \\tfrac, LaTeX spacing
    such as "\\," and \\text{...}.
    """
    if text is None:
        return None
    match = _NUMBER_OR_FRACTION.search(_simplify_latex(text))
    if match is None:
        return None
    value = Fraction(match.group("numerator").replace(",", ""))
    if match.group("denominator") is not None:
        denominator = Fraction(match.group("denominator").replace(",", ""))
        if denominator == 0:
            return None
        value /= denominator
    return value


def extract_answer(text: str) -> str | None:
    """Return the final-answer part of a solution, or None if it contains no number.

    Tries, in order, and keeps the first that contains a number: the text after the last "####",
    the last \\boxed{...}, the text after the last "The answer is" or "answer:", and else the last
    number in the text.
    """
    if "####" in text:
        candidate = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
        if normalize_number(candidate) is not None:
            return candidate.strip()

    for candidate in reversed(_boxed_contents(text)):
        if normalize_number(candidate) is not None:
            return candidate.strip()

    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        candidate = match.group("answer")
        if normalize_number(candidate) is not None:
            return candidate.strip()

    numbers = list(_NUMBER_OR_FRACTION.finditer(_simplify_latex(text)))
    return numbers[-1].group(0) if numbers else None


def score_gsm8k(
    references: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    *,
    train_references: Sequence[dict[str, Any]] | None = None,
) -> ScoreResult:
    """Score GSM8K solutions by exact numeric match of the final answer with the gold "#### N".

    Per row, accuracy is the fraction of its completions whose extracted answer equals the gold
    answer. The headline "accuracy" is the mean over rows. `train_references` is accepted for the
    shared interface and unused.
    """
    del train_references
    if len(references) != len(completions):
        raise ScoringError(
            f"got {len(references)} references but {len(completions)} completion lists; "
            "pass one list of completions per reference row"
        )
    if not references:
        raise ScoringError("no references to score; pass at least one reference row")

    samples = []
    for index, (reference, row_completions) in enumerate(zip(references, completions)):
        gold_text, gold = _gold_answer(index, reference)
        row_id = reference["id"]
        if isinstance(row_completions, str) or not row_completions:
            raise ScoringError(
                f"completions for {row_id!r} must be a non-empty list of strings, got {row_completions!r:.80}"
            )
        predicted = []
        correct = []
        for completion in row_completions:
            if not isinstance(completion, str):
                raise ScoringError(
                    f"completions for {row_id!r} contain a {type(completion).__name__}, expected str"
                )
            answer = extract_answer(completion)
            predicted.append(answer)
            correct.append(normalize_number(answer) == gold)
        samples.append(
            {
                "id": row_id,
                "gold": gold_text,
                "predicted": predicted,
                "correct": correct,
                "accuracy": sum(correct) / len(correct),
            }
        )

    accuracy = sum(sample["accuracy"] for sample in samples) / len(samples)
    logger.info("GSM8K accuracy %.4f over %d problems", accuracy, len(samples))
    return ScoreResult(
        metrics={"accuracy": accuracy}, samples=samples, per_sample_metrics={"accuracy": "accuracy"}
    )


def _gold_answer(index: int, reference: dict[str, Any]) -> tuple[str, Fraction]:
    """Return the gold answer text after "####" and its value, raising ScoringError if invalid."""
    if not isinstance(reference, dict) or "id" not in reference:
        raise ScoringError(f"reference row {index} has no 'id'; add the row id as a string under 'id'")
    row_id = reference["id"]
    answer = reference.get("answer")
    if not isinstance(answer, str) or "####" not in answer:
        raise ScoringError(
            f"reference {row_id!r} has no 'answer' ending in '#### N'; pass the raw GSM8K row"
        )
    gold_text = answer.rsplit("####", 1)[1].strip()
    gold = normalize_number(gold_text)
    if gold is None:
        raise ScoringError(f"reference {row_id!r} has a gold answer that is not a number: {gold_text!r}")
    return gold_text, gold
