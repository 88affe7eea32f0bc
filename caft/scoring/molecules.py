"""Molecule metrics for text-to-SMILES generation (ChEBI-20), so molecule runs are scored with RDKit.

A model reads a ChEBI description and writes a SMILES string. String equality is too strict,
because one molecule has many valid SMILES, so completions are parsed and compared as molecules.

Inputs, as in `caft.scoring.base`:
- `references`: ChEBI-20 rows (`CID`, `SMILES`, `description`) with an added `"id"`.
- `completions`: for each row, a list of one or more generated strings. The SMILES is the first
  whitespace-separated token of the completion, with surrounding quotes or backticks removed.
- `train_references` (optional): ChEBI-20 training rows, for `novelty`.

Metrics, each per completion, averaged over a row's completions, then over rows:
- `validity`: the SMILES parses to a molecule with at least one atom.
- `exact_match`: its canonical isomeric SMILES equals the reference's.
- `morgan_tanimoto`, `maccs_tanimoto`: Tanimoto similarity to the reference of Morgan
  fingerprints (radius 2, 2048 bits) and of MACCS keys, with 0 for an invalid completion.
Corpus-level metrics, over all valid completions pooled:
- `morgan_tanimoto_valid`, `maccs_tanimoto_valid`: the same similarities over valid completions only.
- `uniqueness`: distinct canonical SMILES / valid completions.
- `novelty`: valid completions whose canonical SMILES is not among the training SMILES / valid
  completions. Present only when `train_references` is given.
A corpus-level metric is 0.0 when no completion is valid.

Example:
    result = score_chebi20(rows, [["CCO"], ["c1ccccc1"]])
    result.metrics["validity"]          # 1.0
    canonical_smiles("OCC")             # "CCO"
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from statistics import fmean
from typing import Any

from rdkit import Chem, DataStructs, rdBase
from rdkit.Chem import MACCSkeys, rdFingerprintGenerator

from .base import ScoreResult, ScoringError, check_inputs

logger = logging.getLogger(__name__)

SMILES_FIELD = "SMILES"
MORGAN_RADIUS = 2
MORGAN_BITS = 2048
_QUOTE_CHARACTERS = "\"'`"
PER_SAMPLE_METRICS = ("validity", "exact_match", "morgan_tanimoto", "maccs_tanimoto")


@contextmanager
def _quiet_rdkit() -> Iterator[None]:
    """Silence RDKit's log (parse errors of invalid SMILES) and restore its previous state afterwards."""
    # BlockLogs restores the levels set before it. RDLogger.DisableLog followed by EnableLog would
    # instead turn on logs that the caller had turned off.
    with rdBase.BlockLogs():
        yield


def extract_smiles(completion: str) -> str:
    """Return the SMILES candidate in a completion: its first token, without surrounding quotes."""
    tokens = completion.split()
    if not tokens:
        return ""
    return tokens[0].strip(_QUOTE_CHARACTERS)


def _parse(smiles: str) -> Chem.Mol | None:
    """Parse a SMILES string, returning None when it is empty, invalid or has no atoms."""
    if not smiles:
        return None
    with _quiet_rdkit():
        molecule = Chem.MolFromSmiles(smiles)
    if molecule is None or molecule.GetNumAtoms() == 0:
        return None
    return molecule


def canonical_smiles(text: str) -> str | None:
    """Return RDKit's canonical isomeric SMILES of `text`, or None when it is not a valid SMILES."""
    molecule = _parse(text.strip())
    if molecule is None:
        return None
    return Chem.MolToSmiles(molecule, isomericSmiles=True)


def _reference_molecule(row: dict[str, Any]) -> Chem.Mol:
    smiles = row.get(SMILES_FIELD)
    if not isinstance(smiles, str) or not smiles.strip():
        raise ScoringError(
            f"ChEBI-20 row {row.get('id')!r} has no reference SMILES in field {SMILES_FIELD!r}. "
            "Pass rows read from the ChEBI-20 file (columns CID, SMILES, description)"
        )
    molecule = _parse(smiles.strip())
    if molecule is None:
        raise ScoringError(
            f"reference SMILES {smiles!r} of ChEBI-20 row {row.get('id')!r} is not valid for RDKit. "
            "Fix the row or drop it from the test set"
        )
    return molecule


def _train_smiles(train_references: Sequence[dict[str, Any]]) -> set[str]:
    """Return the canonical SMILES of the training rows, skipping (and counting) invalid ones."""
    canonical = set()
    invalid = 0
    for row in train_references:
        smiles = canonical_smiles(str(row.get(SMILES_FIELD) or ""))
        if smiles is None:
            invalid += 1
        else:
            canonical.add(smiles)
    if invalid:
        logger.warning(
            "%d of %d training rows have no valid SMILES and are left out of the novelty set",
            invalid,
            len(train_references),
        )
    return canonical


def score_chebi20(
    references: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    *,
    train_references: Sequence[dict[str, Any]] | None = None,
) -> ScoreResult:
    """Score generated SMILES against ChEBI-20 references: validity, exact match and similarity."""
    check_inputs(references, completions)
    reference_molecules = [_reference_molecule(row) for row in references]
    morgan = rdFingerprintGenerator.GetMorganGenerator(radius=MORGAN_RADIUS, fpSize=MORGAN_BITS)

    samples: list[dict[str, Any]] = []
    valid_canonical: list[str] = []
    valid_morgan: list[float] = []
    valid_maccs: list[float] = []
    for row, reference, row_completions in zip(references, reference_molecules, completions):
        reference_canonical = Chem.MolToSmiles(reference, isomericSmiles=True)
        reference_morgan = morgan.GetFingerprint(reference)
        reference_maccs = MACCSkeys.GenMACCSKeys(reference)

        per_completion = []
        for completion in row_completions:
            smiles = extract_smiles(completion)
            molecule = _parse(smiles)
            result: dict[str, Any] = {"smiles": smiles, "canonical": None}
            result.update(dict.fromkeys(PER_SAMPLE_METRICS, 0.0))
            if molecule is not None:
                canonical = Chem.MolToSmiles(molecule, isomericSmiles=True)
                morgan_similarity = DataStructs.TanimotoSimilarity(
                    reference_morgan, morgan.GetFingerprint(molecule)
                )
                maccs_similarity = DataStructs.TanimotoSimilarity(
                    reference_maccs, MACCSkeys.GenMACCSKeys(molecule)
                )
                result.update(
                    canonical=canonical,
                    validity=1.0,
                    exact_match=float(canonical == reference_canonical),
                    morgan_tanimoto=morgan_similarity,
                    maccs_tanimoto=maccs_similarity,
                )
                valid_canonical.append(canonical)
                valid_morgan.append(morgan_similarity)
                valid_maccs.append(maccs_similarity)
            per_completion.append(result)

        sample: dict[str, Any] = {"id": row["id"], "reference_canonical": reference_canonical}
        for name in PER_SAMPLE_METRICS:
            sample[name] = fmean(result[name] for result in per_completion)
        sample["completions"] = per_completion
        samples.append(sample)

    metrics = {name: fmean(sample[name] for sample in samples) for name in PER_SAMPLE_METRICS}
    valid_count = len(valid_canonical)
    metrics["morgan_tanimoto_valid"] = fmean(valid_morgan) if valid_count else 0.0
    metrics["maccs_tanimoto_valid"] = fmean(valid_maccs) if valid_count else 0.0
    metrics["uniqueness"] = len(set(valid_canonical)) / valid_count if valid_count else 0.0
    if train_references is not None:
        train_set = _train_smiles(train_references)
        novel = sum(smiles not in train_set for smiles in valid_canonical)
        metrics["novelty"] = novel / valid_count if valid_count else 0.0
    return ScoreResult(
        metrics=metrics,
        samples=samples,
        per_sample_metrics={name: name for name in PER_SAMPLE_METRICS},
    )
