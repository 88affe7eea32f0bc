"""The `caft` command line: help, YAML configs and their errors."""

import pytest

from caft.cli import build_parser, main
from caft.run_config import config_fields


def _help(command):
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.choices and command in action.choices)
    return subparsers.choices[command].format_help()


@pytest.mark.parametrize("command", ["finetune", "train-heads"])
def test_help_lists_every_option_with_default(command):
    text = " ".join(_help(command).split())
    for field in config_fields(command):
        assert "--" + field.name.replace("_", "-") in text, field.name
    assert "Default: 4." in text  # num_aux_heads
    assert "Default: 0.01." in text  # heads_coefficient
    assert "(tokens)" in text  # units are stated


def test_train_heads_help_hides_finetuning_options():
    text = _help("train-heads")
    assert "--lora-r" not in text
    assert "--mode " not in text
    assert "--head-train-steps" in text


def _write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _error(capsys, argv):
    status = main(argv)
    assert status == 2
    return capsys.readouterr().err


def test_unknown_yaml_key_named(tmp_path, capsys):
    path = _write(tmp_path, "model: x\nnum_aux_head: 3\n")
    message = _error(capsys, ["finetune", "--config", path])
    assert "num_aux_head" in message
    assert "did you mean 'num_aux_heads'" in message
    assert path in message


def test_wrong_type_named(tmp_path, capsys):
    path = _write(tmp_path, "model: x\nmax_steps: ten\n")
    assert "max_steps must be of type int" in _error(capsys, ["finetune", "--config", path])


def test_invalid_choice_named(tmp_path, capsys):
    path = _write(tmp_path, "model: x\nhead_type: mlp\n")
    assert "head_type must be one of" in _error(capsys, ["finetune", "--config", path])


def test_missing_config_file(tmp_path, capsys):
    assert "config file not found" in _error(capsys, ["finetune", "--config", str(tmp_path / "nope.yaml")])


def test_unknown_trainer_argument_before_loading(tmp_path, capsys):
    message = _error(
        capsys,
        ["finetune", "--model", str(tmp_path / "absent"), "--data", "d.jsonl", "--trainer", "{bf16s: true}"],
    )
    assert "bf16s" in message
    assert "did you mean 'bf16'" in message


def test_missing_model_is_one_line(capsys):
    message = _error(capsys, ["finetune", "--data", "d.jsonl"])
    assert message.strip() == "caft: error: no model given: set `model` in the config or pass --model"


def test_finetune_options_in_yaml_ignored_by_train_heads(tmp_path):
    from caft.cli import build_configs

    path = _write(tmp_path, "model: m\ndata: d\nlora_r: 4\nnum_aux_heads: 2\n")
    args = build_parser().parse_args(["train-heads", "--config", path])
    run_config, caft_config = build_configs(args)
    assert run_config.lora_r == 16  # the default: head training has no LoRA
    assert caft_config.num_aux_heads == 2


def test_missing_model_folder_is_clear(tmp_path, capsys):
    status = main(
        [
            "finetune",
            "--model",
            str(tmp_path / "no-model"),
            "--data",
            "x.jsonl",
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    assert status == 2
    assert "model folder not found" in capsys.readouterr().err


def test_command_line_overrides_yaml(tmp_path):
    from caft.cli import build_configs

    path = _write(tmp_path, "model: a\nnum_aux_heads: 2\nlearning_rate: 1\n")
    args = build_parser().parse_args(
        ["finetune", "--config", path, "--num-aux-heads", "3", "--output-dir", "out"]
    )
    run_config, caft_config = build_configs(args)
    assert caft_config.num_aux_heads == 3
    assert run_config.output_dir == "out"
    assert run_config.learning_rate == 1.0  # YAML int accepted for a float option
    assert run_config.model == "a"


def test_assets_variable_expanded(tmp_path, monkeypatch):
    from caft.cli import build_configs

    monkeypatch.setenv("CAFT_ASSETS", "/some/assets")
    path = _write(tmp_path, "model: ${CAFT_ASSETS}/models/m\n")
    run_config, _ = build_configs(build_parser().parse_args(["finetune", "--config", path]))
    assert run_config.model == "/some/assets/models/m"


@pytest.mark.parametrize(
    "example", sorted(p.name for p in __import__("pathlib").Path("examples").glob("*.yaml"))
)
def test_example_configs_are_valid(example):
    from caft.cli import build_configs

    args = build_parser().parse_args(["finetune", "--config", f"examples/{example}"])
    run_config, caft_config = build_configs(args)
    assert run_config.model
    assert run_config.data
