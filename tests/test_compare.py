"""`caft compare` end to end on a tiny random Llama: every run, table, JSON and plot; resume; guards."""

import json

import pytest
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from caft.cli import main
from caft.compare import CompareConfig


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, stories_model_dir):
    """A random-init 2-layer Llama with the real stories260k tokenizer (vocabulary 512)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_model_dir).save_pretrained(folder)
    return folder


def _config(tmp_path, model_dir, **changes):
    values = {
        "task": "chebi20",
        "model": str(model_dir),
        "output_dir": str(tmp_path / "compare"),
        "prepare": {"test_rows": 6, "train_rows": 24},
        "seeds": [0, 1],
        "methods": ["lora", "full"],
        "head_training": {"steps": 2, "per_device_train_batch_size": 4},
        "finetune": {"max_steps": 3, "per_device_train_batch_size": 4, "max_length": 320, "logging_steps": 1},
        "eval": {"batch_size": 8, "max_new_tokens": 8},
        "bootstrap_samples": 100,
    }
    values.update(changes)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_compare_end_to_end(tmp_path, tiny_model_dir, capsys, caplog):
    config = _config(tmp_path, tiny_model_dir)
    assert main(["compare", "--config", str(config)]) == 0
    out = tmp_path / "compare"
    for name in ("results.json", "results.md", "plots/training_curves.png", "plots/metrics.png",
                 "compare_config.json", "data/chebi20.train.jsonl", "data/chebi20.test.jsonl",
                 "heads/heads/heads_config.json"):
        assert (out / name).is_file(), name
    for png in ("plots/training_curves.png", "plots/metrics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("lora", "full"):
        for mode in ("ntp", "caft"):
            for seed in (0, 1):
                run = out / "runs" / f"{method}-{mode}-seed{seed}"
                report = json.loads((run / "eval.json").read_text())
                assert len(report["samples"]) == 6
                assert 0 <= report["validity"] <= 1
                heads = report["intrinsic"]["heads"]
                assert len(heads) == 5 and all(head["targets"] > 0 for head in heads)
                assert len((run / "eval.predictions.jsonl").read_text().splitlines()) == 6
                scores = json.loads((run / "scores.json").read_text())
                assert scores["ids"] == [sample["id"] for sample in report["samples"]]
                assert scores["per_row"]["validity"] == [sample["validity"] for sample in report["samples"]]
                assert not (run / "checkpoints").exists()

    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 8
    rows = {(row["method"], row["metric"]): row for row in results["summary"]}
    validity = rows[("full", "validity")]
    assert len(validity["ntp"]["values"]) == 2
    assert validity["difference"]["resampled"] == "seeds and rows"
    assert rows[("lora", "uniqueness")]["difference"]["resampled"] == "seeds"
    # The reported difference is the paired mean difference of the runs' own scores.
    expected = (sum(validity["caft"]["values"]) - sum(validity["ntp"]["values"])) / 2
    assert validity["difference"]["mean"] == pytest.approx(expected)
    table = (out / "results.md").read_text()
    assert "| full | validity |" in table
    assert "CAFT − NTP" in table
    assert "Only 2 seeds" in table
    assert "results.md" in capsys.readouterr().out

    # Rerunning resumes: every run is skipped, and the report is the same.
    caplog.set_level("INFO", logger="caft.compare")
    assert main(["compare", "--config", str(config)]) == 0
    assert sum("done earlier, skipped" in record.message for record in caplog.records) == 8
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

    # Other settings in the same folder are refused, naming what differs.
    changed = _config(tmp_path, tiny_model_dir, finetune={"max_steps": 4, "per_device_train_batch_size": 4})
    assert main(["compare", "--config", str(changed)]) == 2
    assert "finetune differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"methods": ["qlora"]}, "methods must be a non-empty list"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"finetune": {"seed": 3}}, "set by the comparison"),
        ({"eval": {"beams": 2}}, "eval: unknown options"),
        ({"colour": "red"}, "unknown keys"),
    ],
)
def test_bad_compare_configs(tmp_path, changes, message):
    values = {"task": "chebi20", "model": "m", "output_dir": str(tmp_path), **changes}
    with pytest.raises(ValueError, match=message):
        CompareConfig.from_dict(values)


def test_one_seed_gives_no_interval(tmp_path):
    from caft.compare import markdown_table

    config = CompareConfig.from_dict({"task": "chebi20", "model": "m", "output_dir": str(tmp_path), "seeds": [0]})
    row = {
        "method": "full", "metric": "perplexity", "seeds": [0],
        "ntp": {"mean": 9.0, "sd": 0.0, "values": [9.0]}, "caft": {"mean": 8.0, "sd": 0.0, "values": [8.0]},
        "difference": {"mean": -1.0, "low": None, "high": None, "significant": None},
    }
    line = markdown_table(config, [row]).splitlines()[-1]
    assert line == "| full | perplexity | 9.0000 | 8.0000 | -1.0000 | one seed: no interval |"
