"""Molecule (ChEBI-20) and protein (CFP-Gen) scoring, on hand cases and the real reference files."""

import csv
import json
import time

import pytest

from caft.scoring.base import ScoringError
from caft.scoring.molecules import canonical_smiles, extract_smiles, score_chebi20
from caft.scoring.proteins import extract_sequence, global_identity, is_valid_sequence, score_cfp_gen

ETHANOL = {"id": "702", "SMILES": "CCO", "description": "ethanol"}
BENZENE = {"id": "241", "SMILES": "c1ccccc1", "description": "benzene"}


@pytest.fixture(scope="module")
def chebi_rows(assets):
    path = assets / "data" / "molecules" / "chebi20" / "validation.txt"
    if not path.is_file():
        pytest.skip(f"ChEBI-20 validation file not found at {path}")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    for row in rows:
        row["id"] = row["CID"]
    return rows


@pytest.fixture(scope="module")
def cfp_rows(assets):
    path = assets / "data" / "proteins" / "cfp-gen" / "CFP-Gen.keyword-guided.json"
    if not path.is_file():
        pytest.skip(f"CFP-Gen file not found at {path}")
    rows = json.loads(path.read_text(encoding="utf-8"))
    for index, row in enumerate(rows):
        row["id"] = str(index)
    return rows


# Molecules


def test_canonical_smiles_equivalent_forms():
    assert canonical_smiles("OCC") == canonical_smiles("CCO")
    assert canonical_smiles("C1=CC=CC=C1") == canonical_smiles("c1ccccc1")


def test_canonical_smiles_keeps_stereo():
    assert canonical_smiles("C[C@H](N)C(=O)O") != canonical_smiles("C[C@@H](N)C(=O)O")


def test_canonical_smiles_invalid_is_none():
    assert canonical_smiles("not a molecule") is None
    assert canonical_smiles("C1CC") is None  # unclosed ring
    assert canonical_smiles("") is None
    assert canonical_smiles("   ") is None


def test_extract_smiles_first_token_unquoted():
    assert extract_smiles("  `CCO` is ethanol\nmore text") == "CCO"
    assert extract_smiles('"c1ccccc1"') == "c1ccccc1"
    assert extract_smiles("\n\n") == ""


def test_gold_smiles_scores_perfect():
    result = score_chebi20([ETHANOL, BENZENE], [["CCO"], ["c1ccccc1"]])
    for name in ("validity", "exact_match", "morgan_tanimoto", "maccs_tanimoto"):
        assert result.metrics[name] == pytest.approx(1.0), name


def test_garbage_smiles_is_invalid():
    result = score_chebi20([ETHANOL], [["The molecule is a primary alcohol."]])
    assert result.metrics["validity"] == 0.0
    assert result.metrics["exact_match"] == 0.0
    assert result.metrics["morgan_tanimoto"] == 0.0
    assert result.metrics["maccs_tanimoto"] == 0.0
    assert result.samples[0]["completions"][0]["canonical"] is None


def test_noncanonical_smiles_is_exact_match():
    result = score_chebi20([ETHANOL], [["OCC"]])
    assert result.metrics["exact_match"] == 1.0
    assert result.metrics["morgan_tanimoto"] == pytest.approx(1.0)


def test_wrong_stereo_is_not_exact_match():
    alanine = {"id": "5950", "SMILES": "C[C@@H](C(=O)O)N"}
    result = score_chebi20([alanine], [["C[C@H](C(=O)O)N"]])
    assert result.metrics["validity"] == 1.0
    assert result.metrics["exact_match"] == 0.0


def test_similar_molecule_partial_tanimoto():
    result = score_chebi20([ETHANOL], [["CCCO"]])
    assert result.metrics["exact_match"] == 0.0
    assert 0.0 < result.metrics["morgan_tanimoto"] < 1.0
    assert 0.0 < result.metrics["maccs_tanimoto"] <= 1.0


def test_tanimoto_valid_only_skips_invalid():
    result = score_chebi20([ETHANOL], [["CCO", "xyz"]])
    assert result.metrics["validity"] == pytest.approx(0.5)
    assert result.metrics["morgan_tanimoto"] == pytest.approx(0.5)
    assert result.metrics["morgan_tanimoto_valid"] == pytest.approx(1.0)
    assert result.metrics["maccs_tanimoto_valid"] == pytest.approx(1.0)


def test_molecule_uniqueness_counts_canonical_duplicates():
    # "CCO" and "OCC" are one molecule, so 3 valid completions hold 2 distinct molecules.
    result = score_chebi20([ETHANOL, BENZENE], [["CCO", "OCC"], ["c1ccccc1", "garbage"]])
    assert result.metrics["uniqueness"] == pytest.approx(2 / 3)


def test_molecule_novelty_against_train():
    train = [{"CID": "1", "SMILES": "OCC"}, {"CID": "2", "SMILES": "CC(=O)O"}]
    completions = [["CCO", "CCCO"], ["c1ccccc1", "garbage"]]
    result = score_chebi20([ETHANOL, BENZENE], completions, train_references=train)
    # Valid: CCO (in train as OCC), CCCO, benzene, so 2 of 3 are novel.
    assert result.metrics["novelty"] == pytest.approx(2 / 3)


def test_molecule_novelty_absent_without_train():
    result = score_chebi20([ETHANOL], [["CCO"]])
    assert "novelty" not in result.metrics


def test_no_valid_completion_gives_zero_corpus_metrics():
    result = score_chebi20([ETHANOL], [["xx"]], train_references=[BENZENE])
    assert result.metrics["uniqueness"] == 0.0
    assert result.metrics["novelty"] == 0.0
    assert result.metrics["morgan_tanimoto_valid"] == 0.0


def test_molecule_per_sample_metrics_average_to_headline():
    result = score_chebi20([ETHANOL, BENZENE], [["CCO", "CCCO"], ["C1CC"]])
    assert set(result.per_sample_metrics) == {"validity", "exact_match", "morgan_tanimoto", "maccs_tanimoto"}
    for headline, key in result.per_sample_metrics.items():
        mean = sum(sample[key] for sample in result.samples) / len(result.samples)
        assert result.metrics[headline] == pytest.approx(mean)


def test_real_gold_subset_scores_perfect(chebi_rows):
    rows = chebi_rows[:300]
    result = score_chebi20(rows, [[row["SMILES"]] for row in rows])
    assert result.metrics["validity"] == 1.0
    assert result.metrics["exact_match"] == 1.0
    assert result.metrics["morgan_tanimoto"] == pytest.approx(1.0)
    assert result.metrics["maccs_tanimoto"] == pytest.approx(1.0)


@pytest.mark.slow
def test_real_gold_all_rows_valid(chebi_rows):
    assert len(chebi_rows) == 3301
    result = score_chebi20(chebi_rows, [[row["SMILES"]] for row in chebi_rows])
    assert result.metrics["validity"] == 1.0
    assert result.metrics["exact_match"] == 1.0
    assert result.metrics["morgan_tanimoto"] == pytest.approx(1.0)
    assert result.metrics["maccs_tanimoto"] == pytest.approx(1.0)


def test_real_rows_novelty_against_themselves(chebi_rows):
    rows = chebi_rows[:200]
    result = score_chebi20(rows, [[row["SMILES"]] for row in rows], train_references=rows[:50])
    assert result.metrics["novelty"] == pytest.approx(150 / 200)


def test_molecule_row_without_smiles_raises_naming_id():
    with pytest.raises(ScoringError, match="92470518"):
        score_chebi20([{"id": "92470518", "description": "a pterocarpan"}], [["CCO"]])


def test_molecule_invalid_reference_raises_naming_id():
    with pytest.raises(ScoringError, match="'77'.*not valid"):
        score_chebi20([{"id": "77", "SMILES": "C1CC"}], [["CCO"]])


def test_molecule_length_mismatch_raises():
    with pytest.raises(ScoringError, match="2 reference rows but 1"):
        score_chebi20([ETHANOL, BENZENE], [["CCO"]])


def test_molecule_non_string_completion_raises():
    with pytest.raises(ScoringError, match="NoneType"):
        score_chebi20([ETHANOL], [[None]])


# Proteins


def test_identity_of_sequence_with_itself():
    assert global_identity("MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQRQISFVKSHFSRQ") == 1.0


def test_identity_one_substitution_in_ten():
    assert global_identity("ACDEFGHIKL", "ACDEFGHIKV") == pytest.approx(0.9)


def test_identity_one_deletion():
    # One residue deleted: 9 identical columns out of 10, the gap column included.
    assert global_identity("ACDEFGHIKL", "ACDEFGHKL") == pytest.approx(0.9)


def test_identity_counts_end_gaps():
    # Half the reference is missing: 5 identical columns out of 10.
    assert global_identity("ACDEFGHIKL", "ACDEF") == pytest.approx(0.5)


def test_identity_divides_by_alignment_columns():
    # The best alignment shifts by five: AAAAACCCCC----- over -----CCCCCDDDDD, 5 identical of 15 columns.
    assert global_identity("AAAAACCCCC", "CCCCCDDDDD") == pytest.approx(5 / 15)


def test_identity_empty_is_zero():
    assert global_identity("", "ACDE") == 0.0
    assert global_identity("ACDE", "") == 0.0


def test_identity_unrelated_is_zero():
    assert global_identity("WWWWWWWWWW", "DDDDDDDDDD") == 0.0


def test_identity_is_symmetric():
    first, second = "MKTAYIAKQRQISFVK", "MKTAYLAKQRQISFK"
    assert global_identity(first, second) == pytest.approx(global_identity(second, first))


def test_sequence_alphabet_validity():
    assert is_valid_sequence("MKTAYIAKQR")
    assert is_valid_sequence(" MKTAY\nIAKQR \n")
    assert not is_valid_sequence("MKTAYXAKQR")  # X, unknown residue
    assert not is_valid_sequence("MKTAYBZ")  # ambiguity codes
    assert not is_valid_sequence("mktayiakqr")
    assert not is_valid_sequence("MKTAY*")
    assert not is_valid_sequence("The sequence is MKTAY")
    assert not is_valid_sequence("")
    assert not is_valid_sequence("  \n")


def test_extract_sequence_keeps_uppercase_letters():
    assert extract_sequence(" MKT AY\nIAK ") == "MKTAYIAK"
    assert extract_sequence("MKT-12ay") == "MKT"


def test_invalid_completion_has_zero_identity():
    row = {"id": "0", "reference": "ACDEFGHIKL"}
    result = score_cfp_gen([row], [["ACDEFGHIKLX"]])
    assert result.metrics["valid_alphabet"] == 0.0
    assert result.metrics["identity"] == 0.0


def test_protein_scores_and_lengths():
    rows = [{"id": "0", "reference": "ACDEFGHIKL"}, {"id": "1", "reference": "MKTAYIAKQR"}]
    completions = [["ACDEFGHIKV", "ACDEF"], ["MKTAYIAKQRMKTAYIAKQR"]]
    result = score_cfp_gen(rows, completions)
    assert result.samples[0]["identity"] == pytest.approx((0.9 + 0.5) / 2)
    assert result.samples[0]["lengths"] == [10, 5]
    assert result.samples[1]["lengths"] == [20]
    assert result.samples[0]["length_ratio"] == pytest.approx(0.75)
    assert result.metrics["mean_length"] == pytest.approx((7.5 + 20) / 2)
    assert result.metrics["length_ratio"] == pytest.approx((0.75 + 2.0) / 2)
    assert result.metrics["median_length"] == pytest.approx(10.0)
    assert result.metrics["valid_alphabet"] == 1.0


def test_protein_uniqueness_on_duplicates():
    rows = [{"id": "0", "reference": "ACDEFGHIKL"}, {"id": "1", "reference": "MKTAYIAKQR"}]
    completions = [["ACDEFGHIKL", "ACDEFGHIKL"], ["ACDEFGHIKL", "MKTAYIAKQR", "mkt"]]
    result = score_cfp_gen(rows, completions)
    # 4 valid completions hold 2 distinct sequences. The lowercase one is invalid and not counted.
    assert result.metrics["uniqueness"] == pytest.approx(2 / 4)


def test_protein_novelty_against_train():
    rows = [{"id": "0", "reference": "ACDEFGHIKL"}]
    train = [{"reference": "MKTAYIAKQR"}, {"reference": "ACDEFGHIKL"}]
    completions = [["ACDEFGHIKL", "MKTAYIAKQR", "MKTAYIAKQW", "XXXX"]]
    result = score_cfp_gen(rows, completions, train_references=train)
    # 3 are valid, and only MKTAYIAKQW is absent from the training sequences.
    assert result.metrics["novelty"] == pytest.approx(1 / 3)


def test_protein_novelty_absent_without_train():
    result = score_cfp_gen([{"id": "0", "reference": "ACDE"}], [["ACDE"]])
    assert "novelty" not in result.metrics


def test_protein_per_sample_metrics_average_to_headline():
    rows = [{"id": "0", "reference": "ACDEFGHIKL"}, {"id": "1", "reference": "MKTAYIAKQR"}]
    result = score_cfp_gen(rows, [["ACDEF", "ACDEFGHIKL"], ["MKTAYX"]])
    for headline, key in result.per_sample_metrics.items():
        mean = sum(sample[key] for sample in result.samples) / len(result.samples)
        assert result.metrics[headline] == pytest.approx(mean), headline


def test_real_reference_subset_against_themselves(cfp_rows):
    rows = cfp_rows[:60]
    result = score_cfp_gen(rows, [[row["reference"]] for row in rows])
    assert result.metrics["valid_alphabet"] == 1.0
    assert result.metrics["identity"] == 1.0
    assert result.metrics["length_ratio"] == 1.0


@pytest.mark.slow
def test_real_references_against_themselves(cfp_rows):
    assert len(cfp_rows) == 260
    result = score_cfp_gen(cfp_rows, [[row["reference"]] for row in cfp_rows])
    assert result.metrics["valid_alphabet"] == 1.0
    assert result.metrics["identity"] == 1.0
    assert result.metrics["length_ratio"] == 1.0
    assert result.metrics["uniqueness"] == pytest.approx(259 / 260)  # one reference occurs twice


def test_real_model_responses_score_below_one(cfp_rows):
    rows = cfp_rows[:40]
    result = score_cfp_gen(rows, [[row["response#1"], row["response#2"]] for row in rows])
    assert 0.0 < result.metrics["identity"] < 0.9
    assert 0.0 < result.metrics["valid_alphabet"] <= 1.0


def test_alignment_speed_hundred_pairs():
    residues = "ACDEFGHIKLMNPQRSTVWY"
    first = [(residues * 16)[offset : offset + 300] for offset in range(20)] * 5
    second = [sequence[::-1] for sequence in first]
    start = time.perf_counter()
    for a, b in zip(first, second):
        global_identity(a, b)
    assert time.perf_counter() - start < 3.0


def test_protein_row_without_reference_raises_naming_id():
    with pytest.raises(ScoringError, match="'17'"):
        score_cfp_gen([{"id": "17", "instruction": "Generate a protein"}], [["MKT"]])


def test_protein_reference_outside_matrix_raises():
    with pytest.raises(ScoringError, match="'3'.*'U'"):
        score_cfp_gen([{"id": "3", "reference": "MKTUAY"}], [["MKT"]])


def test_protein_length_mismatch_raises():
    with pytest.raises(ScoringError, match="1 reference rows but 2"):
        score_cfp_gen([{"id": "0", "reference": "ACDE"}], [["ACDE"], ["ACDE"]])
