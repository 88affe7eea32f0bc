"""The `caft` command line: `caft finetune` and `caft train-heads`.

Each command reads an optional YAML config whose keys are the option names with underscores
(`num_aux_heads: 4`), then applies command-line options on top (`--num-aux-heads 2`). Values may
use `${CAFT_ASSETS}`, which defaults to `../shared`. `caft finetune --help` lists every option.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .assets import expand_path_variables
from .config import CAFTConfig
from .run_config import FinetuneConfig, config_fields

logger = logging.getLogger("caft")

_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}


class ConfigError(ValueError):
    """An invalid YAML config or option value."""


def _base_type(field: Field) -> type:
    """Return the Python type of a dataclass field, read from its (string) annotation."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "str")
    names = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
    return _TYPES.get(names[0], str) if names else str


def _default_text(field: Field) -> str:
    if field.default is not MISSING:
        return repr(field.default) if isinstance(field.default, str) else str(field.default)
    if field.default_factory is not MISSING:  # type: ignore[misc]
        return str(field.default_factory())  # type: ignore[misc]
    return "required"


def _parse_mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a YAML/JSON mapping such as '{{bf16: true}}', got {text!r}"
        )
    return value


def add_config_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add one option per config field that `command` uses; unset options stay absent so YAML values survive."""
    finetune_group = parser.add_argument_group("run options")
    caft_group = parser.add_argument_group("CAFT heads and loss (CAFTConfig)")
    caft_names = {field.name for field in CAFTConfig.__dataclass_fields__.values()}
    for field in config_fields(command):
        group = caft_group if field.name in caft_names else finetune_group
        option = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata.get('help', '')} Default: {_default_text(field)}."
        kind = _base_type(field)
        if kind is bool:
            group.add_argument(
                option,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif kind is dict:
            group.add_argument(
                option,
                dest=field.name,
                type=_parse_mapping,
                default=argparse.SUPPRESS,
                metavar="MAPPING",
                help=help_text,
            )
        else:
            group.add_argument(
                option,
                dest=field.name,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=help_text,
            )


def read_yaml_config(path: Path, command: str = "finetune") -> dict[str, Any]:
    """Read a flat YAML mapping of option names to values, naming the file in every error.

    Options that only `caft finetune` uses are accepted and dropped for other commands, so one
    file can serve both.
    """
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values at the top level")

    known = {field.name for field in config_fields("finetune")}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown option {key!r}{hint} (see `caft finetune --help`)")
    used = {field.name for field in config_fields(command)}
    ignored = sorted(set(values) - used)
    if ignored:
        logger.debug("%s: options %s do not apply to `caft %s`", path, ignored, command)
    return {key: value for key, value in values.items() if key in used}


def _coerce(name: str, value: Any, field: Field, source: str) -> Any:
    """Check a YAML value's type against the field and expand `${CAFT_ASSETS}` in strings."""
    if value is None:
        return None
    kind = _base_type(field)
    if isinstance(value, str):
        value = expand_path_variables(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be of type {kind.__name__}, got {value!r}")
    return value


def build_configs(args: argparse.Namespace) -> tuple[FinetuneConfig, CAFTConfig]:
    """Merge dataclass defaults, the YAML config and command-line options, in that order."""
    command = getattr(args, "command", None) or "finetune"
    values: dict[str, Any] = {}
    source = "command line"
    if getattr(args, "config", None):
        source = str(args.config)
        values.update(read_yaml_config(Path(args.config), command))
    for field in config_fields(command):
        if field.name in vars(args):
            values[field.name] = getattr(args, field.name)

    known = {field.name: field for field in config_fields("finetune")}
    values = {name: _coerce(name, value, known[name], source) for name, value in values.items()}
    caft_names = set(CAFTConfig.__dataclass_fields__)
    try:
        caft_config = CAFTConfig(**{k: v for k, v in values.items() if k in caft_names and v is not None})
        run_config = FinetuneConfig(**{k: v for k, v in values.items() if k not in caft_names})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid configuration ({source}): {error}") from error
    return run_config, caft_config


def _setup_logging(level: str) -> None:
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("caft").setLevel(level.upper())
    transformers.logging.set_verbosity_warning()


def _print_result(result, title: str) -> None:
    from .run_outputs import format_summary, is_main_process

    if not is_main_process():  # one summary under `accelerate launch`, not one per process
        return
    print(f"\n{title}")
    print(format_summary(result.summary))
    print()
    if result.model_dir is not None:
        print(f"model (no heads): {result.model_dir}")
    if result.heads_dir is not None:
        print(f"heads:            {result.heads_dir}")
    print(f"metrics:          {result.metrics_path}")


def command_finetune(args: argparse.Namespace) -> int:
    from .pipeline import run_finetune

    run_config, caft_config = build_configs(args)
    result = run_finetune(run_config, caft_config)
    if run_config.mode == "ntp":
        title = f"Next-token baseline fine-tuning finished ({run_config.method}). Summary:"
    else:
        title = f"CAFT fine-tuning finished ({run_config.method}). Per-head summary:"
    _print_result(result, title)
    return 0


def command_train_heads(args: argparse.Namespace) -> int:
    from .pipeline import run_train_heads

    run_config, caft_config = build_configs(args)
    result = run_train_heads(run_config, caft_config)
    _print_result(result, "Head training finished (trunk frozen). Per-head summary:")
    return 0


def command_heads_info(args: argparse.Namespace) -> int:
    from .heads_hub import format_heads_info, heads_info

    info = heads_info(args.path)
    print(json.dumps(info, indent=2) if args.json else format_heads_info(info))
    return 0


def command_heads_push(args: argparse.Namespace) -> int:
    from .heads_hub import push_heads

    url = push_heads(
        args.path, args.repo_id, private=args.private, token=args.token, commit_message=args.message
    )
    print(f"pushed {args.path} to {url}")
    return 0


def add_heads_commands(commands) -> None:
    heads = commands.add_parser("heads", help="Inspect or share a heads folder.")
    actions = heads.add_subparsers(dest="heads_command", required=True)

    info = actions.add_parser("info", help="Print a heads folder's base model, settings and accuracy.")
    info.add_argument("path", help="Heads folder (OUTPUT_DIR/heads of a run) or a Hub repository id.")
    info.add_argument("--json", action="store_true", help="Print the metadata as JSON.")
    info.set_defaults(handler=command_heads_info)

    push = actions.add_parser("push", help="Upload a heads folder with a model card to the Hugging Face Hub.")
    push.add_argument("path", help="Heads folder to upload.")
    push.add_argument("repo_id", help="Target repository, OWNER/NAME (created if missing).")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument(
        "--token", default=None, help="Hub token. Default: the HF_TOKEN variable or the saved login."
    )
    push.add_argument("--message", default=None, help="Commit message. Default: names the base model.")
    push.set_defaults(handler=command_heads_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caft",
        description="Concept-aware fine-tuning: train causal LMs with auxiliary multi-token prediction heads.",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="Verbosity of caft's own log messages. Default: info.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    finetune = commands.add_parser(
        "finetune",
        help="Attach heads, optionally train them, then fine-tune with the CAFT loss and export.",
        description="Fine-tune a causal LM with CAFT (or the next-token baseline with --mode ntp). "
        "Options override the YAML config given with --config.",
    )
    finetune.add_argument("--config", type=Path, help="YAML file of options (keys use underscores).")
    add_config_options(finetune, "finetune")
    finetune.set_defaults(handler=command_finetune)

    train_heads = commands.add_parser(
        "train-heads",
        help="Train auxiliary heads with the base model frozen and save them.",
        description="Train auxiliary heads on a frozen base model (steps: --head-train-steps, "
        "learning rate: --head-learning-rate) and save them to OUTPUT_DIR/heads.",
    )
    train_heads.add_argument(
        "--config",
        type=Path,
        help="YAML file of options (keys use underscores); fine-tuning options in it are ignored.",
    )
    add_config_options(train_heads, "train-heads")
    train_heads.set_defaults(handler=command_train_heads)

    add_heads_commands(commands)
    from .bench import add_bench_command

    add_bench_command(commands)
    from .distill import add_distill_command

    add_distill_command(commands)
    from .eval_cli import add_eval_commands

    add_eval_commands(commands)
    from .compare import add_compare_command

    add_compare_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `caft` command; returns 0 on success and 2 on invalid input (argparse's usage code)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)

    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        # Invalid configs, data, heads and paths raise these with a message that names the input
        # and the fix. A traceback adds nothing for users; --log-level debug shows it.
        if args.log_level == "debug":
            raise
        print(f"caft: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
