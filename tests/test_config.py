"""CAFTConfig: validation, schedules, loss weights and serialisation."""

import math

import pytest

from caft import CAFTConfig


def test_defaults_match_reference_settings():
    config = CAFTConfig()
    assert (config.num_aux_heads, config.heads_coefficient, config.decay, config.schedule) == (
        4,
        0.01,
        0.8,
        "rsine",
    )


@pytest.mark.parametrize(
    "schedule,progress,expected",
    [
        ("rsine", 0.0, 1.0),
        ("rsine", 0.5, math.sin(math.pi / 4)),
        ("rsine", 1.0, 0.0),
        ("sine", 0.0, 0.0),
        ("sine", 1.0, 1.0),
        ("linear", 0.25, 0.75),
        ("constant", 0.9, 1.0),
        ("linear", 1.5, 0.0),  # clamped
    ],
)
def test_schedule_values(schedule, progress, expected):
    assert CAFTConfig(schedule=schedule).schedule_value(progress) == pytest.approx(expected, abs=1e-12)


def test_head_weights_follow_formula():
    config = CAFTConfig(num_aux_heads=3, heads_coefficient=0.1, decay=0.5, schedule="linear")
    # Head k (k = 2, 3, 4) gets beta * s * gamma^(k-1).
    assert config.head_weights(0.5) == pytest.approx([0.1 * 0.5 * 0.5, 0.1 * 0.5 * 0.25, 0.1 * 0.5 * 0.125])


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("num_aux_heads", -1, "num_aux_heads"),
        ("num_aux_heads", 2.5, "num_aux_heads"),
        ("head_type", "mlp", "head_type"),
        ("head_init", "zeros", "head_init"),
        ("schedule", "cosine", "schedule"),
        ("heads_coefficient", -0.1, "heads_coefficient"),
        ("decay", float("nan"), "decay"),
        ("loss_chunk_size", 0, "loss_chunk_size"),
        ("separate_unembedding", "yes", "separate_unembedding"),
    ],
)
def test_invalid_values_rejected(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        CAFTConfig(**{field: value})


def test_json_round_trip(tmp_path):
    config = CAFTConfig(num_aux_heads=2, head_type="resblock", decay=0.7)
    config.save(tmp_path / "caft.json")
    assert CAFTConfig.load(tmp_path / "caft.json") == config


def test_unknown_field_named():
    with pytest.raises(ValueError, match="num_heads"):
        CAFTConfig.from_dict({"num_heads": 3}, source="my.json")
