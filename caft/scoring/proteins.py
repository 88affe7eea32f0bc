"""Protein metrics for function-to-sequence generation (CFP-Gen), so protein runs get sequence-level scores.

A model reads a functional description (GO terms, InterPro domains, keywords) and writes an
amino-acid sequence. There is no single correct sequence, so the scorer reports how close the
sequence is to the reference protein, how long and how varied the generated sequences are, and
whether they only repeat training proteins.

Inputs, as in `caft.scoring.base`:
- `references`: CFP-Gen rows with an added `"id"`. The reference sequence is in `"reference"`.
- `completions`: for each row, a list of one or more generated strings.
- `train_references` (optional): CFP-Gen training rows, for `novelty`.

A completion's sequence is the completion with all whitespace removed (so line-wrapped output is
accepted), keeping only the letters A to Z in upper case. The completion is `valid_alphabet` when,
after removing whitespace, it is non-empty and every character is one of the 20 standard amino
acids in upper case. X (unknown residue), the ambiguity codes B, Z and J, the rare amino acids
U and O, lower case and stop symbols make a completion invalid, because a generator should name
every residue with a standard letter.

Metrics, per completion, averaged over a row's completions, then over rows:
- `valid_alphabet`: 1.0 or 0.0 as above.
- `identity`: global alignment identity to the reference (see `global_identity`), or 0 when invalid.
- `mean_length`: sequence length in residues.
- `length_ratio`: sequence length / reference length.
  Both length metrics count invalid completions too, with the letters their sequence keeps.
Corpus-level metrics, over all completions pooled:
- `median_length`: median sequence length.
- `uniqueness`: distinct valid sequences / valid completions.
- `novelty`: valid sequences not found exactly among the training references / valid completions.
  Present only when `train_references` is given.
`uniqueness` and `novelty` are 0.0 when no completion is valid.

Example:
    result = score_cfp_gen(rows, [["MKTAYIAKQR"], ["MSEQ NCEL"]])
    result.metrics["identity"]            # mean identity over rows
    global_identity("ACDEFGHIKL", "ACDEFGHIKV")   # 0.9
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from statistics import fmean, median
from typing import Any

from Bio.Align import PairwiseAligner, substitution_matrices

from .base import ScoreResult, ScoringError, check_inputs

logger = logging.getLogger(__name__)

REFERENCE_FIELD = "reference"
STANDARD_AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWY")
# Alignment scores: BLOSUM62, gap open -10, gap extend -0.5, with end gaps scored like internal gaps,
# so a sequence much shorter or longer than the reference loses identity for the unmatched columns.
SUBSTITUTION_MATRIX = "BLOSUM62"
GAP_OPEN_SCORE = -10.0
GAP_EXTEND_SCORE = -0.5
PER_SAMPLE_METRICS = {
    "valid_alphabet": "valid_alphabet",
    "identity": "identity",
    "mean_length": "length",
    "length_ratio": "length_ratio",
}


@lru_cache(maxsize=1)
def _aligner() -> PairwiseAligner:
    aligner = PairwiseAligner()
    aligner.mode = "global"
    aligner.substitution_matrix = substitution_matrices.load(SUBSTITUTION_MATRIX)
    # Setting these two sets the internal and the end gap scores alike.
    aligner.open_gap_score = GAP_OPEN_SCORE
    aligner.extend_gap_score = GAP_EXTEND_SCORE
    return aligner


def global_identity(first: str, second: str) -> float:
    """Return the identity of an optimal global alignment of two protein sequences, in [0, 1].

    Identity is identical aligned positions / alignment length, where the length counts every
    column, gaps included. One optimal alignment is used, the first that Biopython returns.
    When several alignments share the best score, their identities can differ slightly.
    Returns 0.0 when either sequence is empty. Raises ValueError (from Biopython) for letters
    outside BLOSUM62's alphabet, which has upper-case letters only.
    """
    if not first or not second:
        return 0.0
    alignment = _aligner().align(first, second)[0]
    columns = alignment.shape[1]
    return alignment.counts().identities / columns


def extract_sequence(completion: str) -> str:
    """Return the completion's letters A to Z in upper case, with whitespace and everything else dropped."""
    return "".join(character for character in completion if "A" <= character <= "Z")


def is_valid_sequence(completion: str) -> bool:
    """Return True when the completion, without whitespace, is non-empty and all standard amino acids."""
    compact = "".join(completion.split())
    return bool(compact) and all(character in STANDARD_AMINO_ACIDS for character in compact)


def _reference_sequence(row: dict[str, Any]) -> str:
    """Return the row's reference sequence without whitespace, raising ScoringError if it is unusable."""
    value = row.get(REFERENCE_FIELD)
    if not isinstance(value, str) or not value.strip():
        raise ScoringError(
            f"CFP-Gen row {row.get('id')!r} has no reference sequence in field {REFERENCE_FIELD!r}. "
            "Pass rows read from the CFP-Gen file"
        )
    sequence = "".join(value.split()).upper()
    alphabet = set(_aligner().substitution_matrix.alphabet) - {"*"}
    unknown = sorted(set(sequence) - alphabet)
    if unknown:
        raise ScoringError(
            f"reference sequence of CFP-Gen row {row.get('id')!r} contains {''.join(unknown)!r}, "
            f"which {SUBSTITUTION_MATRIX} cannot score. Fix the row or drop it from the test set"
        )
    return sequence


def _train_sequences(train_references: Sequence[dict[str, Any]]) -> set[str]:
    sequences = set()
    for row in train_references:
        value = row.get(REFERENCE_FIELD)
        if isinstance(value, str) and value.strip():
            sequences.add("".join(value.split()).upper())
    if len(sequences) < len(train_references):
        logger.info(
            "%d training rows give %d distinct reference sequences for novelty",
            len(train_references),
            len(sequences),
        )
    return sequences


def score_cfp_gen(
    references: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    *,
    train_references: Sequence[dict[str, Any]] | None = None,
) -> ScoreResult:
    """Score generated protein sequences: alphabet validity, identity to the reference, lengths, diversity."""
    check_inputs(references, completions)
    reference_sequences = [_reference_sequence(row) for row in references]

    samples: list[dict[str, Any]] = []
    all_lengths: list[int] = []
    valid_sequences: list[str] = []
    for row, reference, row_completions in zip(references, reference_sequences, completions):
        per_completion = []
        for completion in row_completions:
            sequence = extract_sequence(completion)
            valid = is_valid_sequence(completion)
            identity = global_identity(sequence, reference) if valid else 0.0
            per_completion.append(
                {
                    "valid_alphabet": float(valid),
                    "identity": identity,
                    "length": len(sequence),
                    "length_ratio": len(sequence) / len(reference),
                }
            )
            all_lengths.append(len(sequence))
            if valid:
                valid_sequences.append(sequence)

        sample: dict[str, Any] = {"id": row["id"], "reference_length": len(reference)}
        for key in PER_SAMPLE_METRICS.values():
            sample[key] = fmean(result[key] for result in per_completion)
        sample["lengths"] = [result["length"] for result in per_completion]
        sample["completions"] = per_completion
        samples.append(sample)

    metrics = {name: fmean(sample[key] for sample in samples) for name, key in PER_SAMPLE_METRICS.items()}
    metrics["median_length"] = float(median(all_lengths))
    valid_count = len(valid_sequences)
    metrics["uniqueness"] = len(set(valid_sequences)) / valid_count if valid_count else 0.0
    if train_references is not None:
        train_set = _train_sequences(train_references)
        novel = sum(sequence not in train_set for sequence in valid_sequences)
        metrics["novelty"] = novel / valid_count if valid_count else 0.0
    return ScoreResult(metrics=metrics, samples=samples, per_sample_metrics=dict(PER_SAMPLE_METRICS))
