"""The main job end to end on the real stories260k model and real GSM8K and Alpaca data."""

import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from caft import load_heads
from caft.cli import main

pytestmark = pytest.mark.slow


def _argv(output_dir, extra=()):
    return [
        "finetune",
        "--config",
        "examples/quickstart.yaml",
        "--output-dir",
        str(output_dir),
        "--max-rows",
        "96",
        "--eval-rows",
        "16",
        "--head-train-steps",
        "6",
        "--max-steps",
        "12",
        "--logging-steps",
        "4",
        "--save-steps",
        "6",
        "--max-length",
        "256",
        *extra,
    ]


def _run(tmp_path, assets, extra=()):
    output_dir = tmp_path / "run"
    assert main(_argv(output_dir, extra)) == 0
    return output_dir


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, assets, stories_model_dir):
    return _run(tmp_path_factory.mktemp("quickstart"), assets)


def test_loss_falls(quickstart_run):
    metrics = json.loads((quickstart_run / "metrics.json").read_text())
    finetune = metrics["phases"]["finetune"]
    assert finetune["eval_after"]["eval_head1_loss"] < finetune["eval_before"]["eval_head1_loss"]
    heads = metrics["phases"]["heads"]
    # Head training lowers the auxiliary heads' held-out loss (the trunk is frozen there).
    assert heads["eval_after"]["eval_head2_loss"] < heads["eval_before"]["eval_head2_loss"]
    assert heads["eval_after"]["eval_head1_loss"] == pytest.approx(
        heads["eval_before"]["eval_head1_loss"], rel=1e-6
    )


def test_summary_rows(quickstart_run):
    metrics = json.loads((quickstart_run / "metrics.json").read_text())
    summary = metrics["summary"]
    assert [row["head"] for row in summary["rows"]] == [1, 2, 3, 4, 5]
    assert all(row["loss_end"] is not None for row in summary["rows"])
    assert summary["measured_on"] == "16 held-out rows"
    assert summary["rows"][1]["weight"] == pytest.approx(0.01 * 0.8)
    assert metrics["data"]["eval_rows"] == 16


def test_exported_model_has_no_heads_and_generates(quickstart_run, stories_model_dir):
    model_dir = quickstart_run / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    assert set(model.state_dict()) == set(base.state_dict())
    assert type(model) is type(base)
    # LoRA was merged, so the weights differ from the base model's.
    assert any(not torch.equal(model.state_dict()[k], base.state_dict()[k]) for k in base.state_dict())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template  # the plain template used in training ships with the model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tom has 3 apples and buys 2 more. How many apples does he have?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(
        **inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_heads_load_back_onto_base(quickstart_run, stories_model_dir):
    base = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    caft_model = load_heads(base, quickstart_run / "heads")
    assert len(caft_model.heads) == 4


def test_no_temporary_folders_left(quickstart_run):
    leftovers = [path.name for path in quickstart_run.iterdir() if path.name.startswith(".")]
    assert leftovers == []


def test_outputs_readable_by_others(quickstart_run):
    # Written under the default umask of the test process (022 on this machine and in CI).
    umask = os.umask(0)
    os.umask(umask)
    for path in [
        quickstart_run / "model",
        quickstart_run / "model" / "model.safetensors",
        quickstart_run / "heads" / "heads.safetensors",
        quickstart_run / "metrics.json",
    ]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_ntp_baseline_same_pipeline(tmp_path, assets, stories_model_dir):
    output_dir = _run(
        tmp_path, assets, extra=["--mode", "ntp", "--method", "full", "--learning-rate", "0.0005"]
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert "heads" not in metrics["phases"]
    assert not (output_dir / "heads").exists()
    log = [entry for entry in metrics["phases"]["finetune"]["log_history"] if "loss" in entry][0]
    assert "head2_loss" not in log
    finetune = metrics["phases"]["finetune"]
    assert finetune["eval_after"]["eval_head1_loss"] < finetune["eval_before"]["eval_head1_loss"]
    AutoModelForCausalLM.from_pretrained(output_dir / "model")


def test_rerun_without_resume_rejected(tmp_path, assets, stories_model_dir, capsys):
    output_dir = _run(tmp_path, assets, extra=["--max-steps", "2", "--head-train-steps", "1"])
    capsys.readouterr()
    assert main(_argv(output_dir, ["--no-overwrite-output-dir"])) == 2
    assert "already has checkpoints of an earlier run" in capsys.readouterr().err
    # Resuming with other data is rejected too.
    assert main(_argv(output_dir, ["--resume", "--max-rows", "80"])) == 2
    assert "max_rows: earlier 96, now 80" in capsys.readouterr().err


def test_resume_continues_from_checkpoint(tmp_path, assets, stories_model_dir):
    output_dir = _run(tmp_path, assets, extra=["--max-steps", "6"])
    first_heads = (output_dir / "heads_trained" / "heads.safetensors").read_bytes()
    # Same command with more steps and --resume: head training is reused, fine-tuning continues.
    _run(tmp_path, assets, extra=["--max-steps", "12", "--resume"])
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert "heads" not in metrics["phases"]
    finetune = metrics["phases"]["finetune"]
    # The restored trainer state carries the first run's logs; a restart would repeat steps 1 and 4.
    steps = [entry["step"] for entry in finetune["log_history"] if "loss" in entry]
    assert steps == sorted(set(steps))
    assert max(steps) == 12
    assert "eval_before" not in finetune  # resumed, not started over
    assert (output_dir / "heads_trained" / "heads.safetensors").read_bytes() == first_heads


def test_two_processes_with_accelerate(tmp_path, assets, stories_model_dir):
    # Two CPU processes (gloo): metrics are summed across processes, one process writes outputs.
    import shutil
    import subprocess

    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    output_dir = tmp_path / "ddp"
    command = [
        "accelerate",
        "launch",
        "--num_processes",
        "2",
        "--cpu",
        "-m",
        "caft.cli",
        "finetune",
        "--config",
        "examples/quickstart.yaml",
        "--output-dir",
        str(output_dir),
        "--max-rows",
        "64",
        "--eval-rows",
        "8",
        "--max-length",
        "256",
        "--head-train-steps",
        "2",
        "--max-steps",
        "3",
        "--logging-steps",
        "1",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Per-head summary") == 1
    metrics = json.loads((output_dir / "metrics.json").read_text())
    logs = [entry for entry in metrics["phases"]["finetune"]["log_history"] if "loss" in entry]
    assert len(logs) == 3
    assert "head5_acc" in logs[0]
    AutoModelForCausalLM.from_pretrained(output_dir / "model")


def test_distill_train_heads_finetune_chain(tmp_path, assets, stories_model_dir):
    # The whole head pipeline on the real model: the model answers prompts, heads learn from those
    # answers with the model frozen, and fine-tuning starts from those heads.
    distilled = tmp_path / "distill.jsonl"
    prompts = assets / "data" / "instruct" / "alpaca-demo" / "alpaca_en_demo.json"
    distill_argv = [
        "distill",
        "--model",
        str(stories_model_dir),
        "--prompts",
        f"{prompts}:1",
        "--num-prompts",
        "40",
        "--max-new-tokens",
        "48",
        "--batch-size",
        "20",
        "--output",
        str(distilled),
    ]
    assert main(distill_argv) == 0
    heads_argv = [
        "train-heads",
        "--model",
        str(stories_model_dir),
        "--data",
        str(distilled),
        "--eval-rows",
        "8",
        "--num-aux-heads",
        "2",
        "--head-train-steps",
        "8",
        "--output-dir",
        str(tmp_path / "heads-run"),
    ]
    assert main(heads_argv) == 0
    heads_metrics = json.loads((tmp_path / "heads-run" / "metrics.json").read_text())
    assert heads_metrics["final"]["loss"][0] < heads_metrics["initial"]["loss"][0]

    finetune_argv = _argv(
        tmp_path / "ft",
        [
            "--heads",
            str(tmp_path / "heads-run" / "heads"),
            "--head-train-steps",
            "0",
            "--max-steps",
            "4",
            "--decay",
            "0.5",
        ],
    )
    assert main(finetune_argv) == 0
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["caft_config"]["num_aux_heads"] == 2  # from the loaded heads
    assert metrics["caft_config"]["decay"] == 0.5  # from this run
    assert "heads" not in metrics["phases"]
