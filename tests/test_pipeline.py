"""Pipeline pieces: model export in both forms, and the train-heads job on the real model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from caft import CAFTConfig, add_auxiliary_heads, apply_lora, load_heads
from caft.cli import main
from caft.pipeline import FinetuneConfig, export_model
from tiny_models import make_tiny_model


@pytest.fixture
def gpt2_tokenizer(assets):
    folder = assets / "tokenizers" / "gpt2"
    if not folder.is_dir():
        pytest.skip(f"gpt2 tokenizer not found at {folder}")
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_export_forms(tmp_path, gpt2_tokenizer, export):
    caft_model = add_auxiliary_heads(make_tiny_model("gpt2"), CAFTConfig(num_aux_heads=2))
    apply_lora(caft_model, r=4)
    with torch.no_grad():  # make the adapter non-trivial
        for name, parameter in caft_model.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    caft_model.eval()  # PEFT leaves the model in training mode, with dropout on
    input_ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        expected = caft_model.model(input_ids=input_ids).logits

    config = FinetuneConfig(model="m", data="d", output_dir=str(tmp_path), export=export)
    target = export_model(caft_model, gpt2_tokenizer, config, chat_template="{{ 'x' }}")
    assert target.name == ("model" if export == "merged" else "adapter")
    if export == "merged":
        model = AutoModelForCausalLM.from_pretrained(target)
        assert not any("lora_" in key or key.startswith("heads") for key in model.state_dict())
    else:
        from peft import PeftModel

        assert (target / "adapter_model.safetensors").is_file()
        model = PeftModel.from_pretrained(make_tiny_model("gpt2"), target)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert AutoTokenizer.from_pretrained(target).chat_template == "{{ 'x' }}"


@pytest.mark.slow
def test_train_heads_job_on_stories(tmp_path, assets, stories_model_dir):
    output_dir = tmp_path / "heads-run"
    status = main(
        [
            "train-heads",
            "--model",
            str(stories_model_dir),
            "--data",
            str(assets / "data" / "instruct" / "alpaca-demo" / "alpaca_en_demo.json"),
            "--max-rows",
            "120",
            "--eval-rows",
            "24",
            "--max-length",
            "256",
            "--head-train-steps",
            "15",
            "--num-aux-heads",
            "2",
            "--logging-steps",
            "5",
            "--output-dir",
            str(output_dir),
        ]
    )
    assert status == 0
    metrics = json.loads((output_dir / "metrics.json").read_text())
    phase = metrics["phases"]["heads"]
    for k in (2, 3):
        assert phase["eval_after"][f"eval_head{k}_loss"] < phase["eval_before"][f"eval_head{k}_loss"]
    # Held-out top-1 of every head rises above its copy-initialised value.
    for initial, final in zip(metrics["initial"]["top1"], metrics["final"]["top1"]):
        assert final > initial
    # The trunk is frozen: the next-token loss does not move.
    assert phase["eval_after"]["eval_head1_loss"] == pytest.approx(
        phase["eval_before"]["eval_head1_loss"], rel=1e-6
    )

    base = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    caft_model = load_heads(base, output_dir / "heads")
    assert len(caft_model.heads) == 2
    assert not (output_dir / "model").exists()


def test_loaded_heads_keep_run_loss_settings(tmp_path, caplog):
    from caft import save_heads
    from caft.pipeline import attach_heads

    source = add_auxiliary_heads(make_tiny_model("llama"), CAFTConfig(num_aux_heads=2, decay=0.8))
    save_heads(source, tmp_path / "heads")
    run = FinetuneConfig(model="m", data="d", output_dir=str(tmp_path / "out"), heads=str(tmp_path / "heads"))
    requested = CAFTConfig(num_aux_heads=4, decay=0.5, heads_coefficient=0.2, schedule="constant")
    with caplog.at_level("WARNING"):
        caft_model = attach_heads(make_tiny_model("llama"), run, requested)
    assert caft_model.caft_config.num_aux_heads == 2  # fixed by the saved heads
    assert len(caft_model.heads) == 2
    assert caft_model.caft_config.decay == 0.5  # loss settings come from this run
    assert caft_model.caft_config.heads_coefficient == 0.2
    assert caft_model.caft_config.schedule == "constant"
    assert "num_aux_heads" in caplog.text


def test_untrained_heads_warned(caplog):
    from caft.pipeline import _warn_about_untrained_heads

    with caplog.at_level("WARNING"):
        _warn_about_untrained_heads(FinetuneConfig(model="m", data="d"))
    assert "untrained" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _warn_about_untrained_heads(FinetuneConfig(model="m", data="d", head_train_steps=5))
        _warn_about_untrained_heads(FinetuneConfig(model="m", data="d", mode="ntp"))
    assert caplog.text == ""


@pytest.mark.slow
def test_train_heads_keeps_best_and_reports_baseline(tmp_path, assets, stories_model_dir):
    output_dir = tmp_path / "best"
    status = main(
        [
            "train-heads",
            "--model",
            str(stories_model_dir),
            "--data",
            str(assets / "data" / "instruct" / "alpaca-demo" / "alpaca_en_demo.json"),
            "--max-rows",
            "120",
            "--eval-rows",
            "24",
            "--max-length",
            "256",
            "--num-aux-heads",
            "2",
            "--head-train-steps",
            "12",
            "--eval-steps",
            "4",
            "--early-stopping-patience",
            "2",
            "--head-learning-rate",
            "0.003",
            "--output-dir",
            str(output_dir),
        ]
    )
    assert status == 0
    metrics = json.loads((output_dir / "metrics.json").read_text())
    for key in ("initial", "final"):
        assert len(metrics[key]["top1"]) == 2  # heads t+2 and t+3
        assert all(top5 >= top1 for top1, top5 in zip(metrics[key]["top1"], metrics[key]["top5"]))
    assert metrics["baseline"]["offsets"] == [2, 3]
    assert len(metrics["baseline"]["skip_bigram_top1"]) == 2

    # The kept heads are the evaluated checkpoint with the lowest held-out loss.
    phase = metrics["phases"]["heads"]
    evaluations = [entry for entry in phase["log_history"] if "eval_loss" in entry]
    best = min(evaluations, key=lambda entry: entry["eval_loss"])
    assert phase["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert phase["eval_after"]["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)
    assert metrics["final"]["loss"][0] == pytest.approx(best["eval_head2_loss"], rel=1e-5)


@pytest.mark.slow
def test_train_heads_stops_early_without_improvement(tmp_path, assets, stories_model_dir):
    output_dir = tmp_path / "early"
    argv = [
        "train-heads",
        "--model",
        str(stories_model_dir),
        "--data",
        str(assets / "data" / "instruct" / "alpaca-demo" / "alpaca_en_demo.json"),
        "--max-rows",
        "80",
        "--eval-rows",
        "16",
        "--max-length",
        "128",
        "--num-aux-heads",
        "1",
        "--head-train-steps",
        "20",
        "--eval-steps",
        "2",
        "--early-stopping-patience",
        "1",
        "--head-learning-rate",
        "0",  # the held-out loss never improves
        "--output-dir",
        str(output_dir),
    ]
    assert main(argv) == 0
    metrics = json.loads((output_dir / "metrics.json").read_text())
    steps = [entry["step"] for entry in metrics["phases"]["heads"]["log_history"] if "eval_loss" in entry]
    assert max(steps) == 4  # best at step 2, no improvement at step 4, patience 1
