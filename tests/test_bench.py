"""`caft bench`: the smoke preset end to end, the stacked reference loss and the FLOP count."""

import json
from dataclasses import replace

import pytest
import torch

from caft.bench import (
    PRESETS,
    BenchConfig,
    NOTES_END,
    NOTES_START,
    _build_model,
    read_notes,
    select_configs,
    stacked_caft_loss,
    step_flops,
)
from caft.cli import main

REQUIRED_KEYS = {
    "config",
    "method",
    "vocab",
    "finetuning",
    "dtype",
    "batch",
    "seq",
    "hidden",
    "layers",
    "heads",
    "repeats",
    "peak_memory_mb",
    "step_time_s",
    "min_time_s",
    "max_time_s",
    "tokens_per_s",
    "flops",
}


def _tiny(finetuning="full", dtype="fp32"):
    return BenchConfig(
        vocab=256, finetuning=finetuning, dtype=dtype, batch=2, seq=16, hidden=64, layers=2, intermediate=128
    )


def test_smoke_benchmark_writes_rows_and_page(tmp_path, capsys):
    output, markdown = tmp_path / "results.json", tmp_path / "benchmarks.md"
    status = main(["bench", "--smoke", "--output", str(output), "--markdown", str(markdown)])
    assert status == 0

    rows = json.loads(output.read_text())
    assert {row["method"] for row in rows} == {"ntp", "caft", "stacked", "heads"}
    for row in rows:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
        assert row["peak_memory_mb"] > 0, row
        assert row["step_time_s"] > 0, row
        assert row["min_time_s"] <= row["step_time_s"] <= row["max_time_s"], row
        assert row["flops"] > 0, row

    page = markdown.read_text()
    assert "caft bench --smoke" in page
    assert "## Targets" in page
    assert "CAFT/NTP memory" in page
    assert "v4k-full-fp32" in page
    assert "v4k-full-fp32" in capsys.readouterr().out


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_stacked_loss_matches_library_loss(finetuning):
    caft_model, _, batch = _build_model(_tiny(finetuning), "caft")
    caft_model.eval()  # no LoRA dropout, so both losses see the same network
    expected = caft_model(**batch, mode="caft").loss
    actual = stacked_caft_loss(caft_model, **batch)
    torch.testing.assert_close(actual, expected)


def test_caft_and_ntp_keep_heads_frozen():
    caft_model, optimizer, _ = _build_model(_tiny("lora"), "caft")
    trainable = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    assert not any(id(parameter) in trainable for parameter in caft_model.heads.parameters())
    assert trainable


def test_flops_order_of_methods():
    config = BenchConfig(
        vocab=128256, finetuning="full", dtype="bf16", batch=2, seq=512, hidden=256, layers=2, intermediate=768
    )
    ntp, caft, stacked = (step_flops(config, method) for method in ("ntp", "caft", "stacked"))
    assert ntp < stacked < caft  # the chunked loss adds one forward projection per head
    lora = replace(config, finetuning="lora")
    assert step_flops(lora, "ntp") < ntp  # frozen weights need no weight gradients
    # Unembedding of 1024 tokens: forward, input gradient and weight gradient.
    assert ntp > 3 * 2 * 256 * 128256 * 1024


def test_select_configs_rejects_unknown_name():
    with pytest.raises(ValueError, match="v1k-lora-bf16"):
        select_configs(PRESETS["quick"], ["v1k-lora-bf16"])
    assert len(select_configs(PRESETS["full"], ["v32k-lora-bf16"])) == 1


def test_read_notes_keeps_hand_written_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Old\n\n{NOTES_START}\nProfiled: the log-softmax dominates.\n{NOTES_END}\n")
    assert read_notes(page) == "Profiled: the log-softmax dominates."
    assert read_notes(tmp_path / "missing.md") == ""
