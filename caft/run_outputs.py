"""What a run leaves in its output folder, and the per-head summary it prints.

    OUTPUT_DIR/
      run_config.json   the run's settings, checked when the run is resumed
      checkpoints/      resumable checkpoints, one folder per phase ("heads", "finetune")
      heads_trained/    heads after the head-training phase, reused by --resume
      heads/            the final heads (caft.load_heads format)
      model/ or adapter/  the fine-tuned model without heads (merged), or the LoRA adapter
      metrics.json      settings, data counts, per-phase logs and evaluations, summary

Folders and files are written under a temporary name and renamed into place, so an interrupted
run never leaves a half-written model or heads folder behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .config import CAFTConfig
from .heads_io import default_file_mode
from .model import CAFTModel
from .run_config import FinetuneConfig

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
CHECKPOINTS = "checkpoints"
HEADS_TRAINED = "heads_trained"


# ---------------------------------------------------------------------------------------------
# Processes: under `accelerate launch` only the main process writes


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Atomic writes


def replace_directory(target: Path, write: Callable[[Path], Any]) -> Path:
    """Write a folder with `write(temporary_folder)`, then swap it in, so no half-written folder remains."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(temporary)
        # mkdtemp creates an owner-only folder; give it and its files the usual permissions.
        umask = _umask()
        os.chmod(temporary, 0o777 & ~umask)
        for path in temporary.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(path: Path, content: Any) -> None:
    """Write `content` as indented JSON to `path` through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(content, stream, indent=2, default=str)
            stream.write("\n")
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Owning the output folder


def prepare_output_dir(config: FinetuneConfig) -> None:
    """Make sure checkpoints in `output_dir` belong to this run before any training starts.

    - With `resume`, the earlier run's `run_config.json` must match this run's identity settings.
    - With `overwrite_output_dir`, checkpoints and trained heads of an earlier run are deleted.
    - Otherwise an output folder that already has checkpoints is rejected, because resuming from
      them later would mix two runs.
    """
    output_dir = Path(config.output_dir)
    checkpoints = output_dir / CHECKPOINTS
    has_checkpoints = checkpoints.is_dir() and any(checkpoints.rglob("checkpoint-*"))
    run_config_path = output_dir / RUN_CONFIG_NAME

    if config.resume and has_checkpoints:
        if run_config_path.is_file():
            earlier = json.loads(run_config_path.read_text()).get("identity", {})
            current = json.loads(json.dumps(config.identity(), default=str))
            differences = [
                f"{name}: earlier {earlier.get(name)!r}, now {value!r}"
                for name, value in current.items()
                if earlier.get(name) != value
            ]
            if differences:
                raise ValueError(
                    f"cannot resume the run in {output_dir}: its settings differ from this one ("
                    + "; ".join(differences)
                    + "). Use the earlier settings, or another --output-dir"
                )
    elif config.resume:
        logger.info("No checkpoint in %s yet: starting from the beginning", output_dir)
    elif has_checkpoints:
        if not config.overwrite_output_dir:
            raise ValueError(
                f"{output_dir} already has checkpoints of an earlier run. Pass --resume to continue that "
                "run, --overwrite-output-dir to start over, or choose another --output-dir"
            )
        if is_main_process():
            logger.warning("Deleting checkpoints and trained heads of the earlier run in %s", output_dir)
            shutil.rmtree(checkpoints)
            shutil.rmtree(output_dir / HEADS_TRAINED, ignore_errors=True)
        wait_for_everyone()

    if is_main_process():
        record = {"identity": config.identity(), "config": asdict(config)}
        write_json(run_config_path, record)
    wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Model and heads


def export_model(caft_model: CAFTModel, tokenizer, config: FinetuneConfig, chat_template: str) -> Path:
    """Save the fine-tuned model without heads: merged LoRA or plain weights, or the adapter alone."""
    is_peft = hasattr(caft_model.model, "peft_config")
    # Ship the template the model was trained with (the plain one for a tokenizer without a
    # template, or the one chosen by `chat_template`), so generation formats prompts the same way.
    if getattr(tokenizer, "chat_template", None) not in (None, chat_template):
        logger.info("The exported tokenizer gets the chat template used in training instead of its own")
    tokenizer.chat_template = chat_template

    if is_peft and config.export == "adapter":
        target = Path(config.output_dir) / "adapter"
        exported = caft_model.model
    else:
        target = Path(config.output_dir) / "model"
        exported = caft_model.merge_and_unload()

    def write(folder: Path) -> None:
        exported.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    replace_directory(target, write)
    logger.info("Saved the fine-tuned model (no heads) to %s", target)
    return target


def save_heads_folder(caft_model: CAFTModel, target: Path) -> Path:
    from .heads_io import save_heads

    return replace_directory(target, lambda folder: save_heads(caft_model, folder))


# ---------------------------------------------------------------------------------------------
# Per-head summary


def head_summary(phases: dict[str, Any], caft_config: CAFTConfig, num_heads: int) -> dict[str, Any]:
    """Tabulate each head's loss and top-1 accuracy at the start and the end of the last phase.

    Uses the held-out evaluation when there is one, else the first and last training logs.
    """
    name = "finetune" if "finetune" in phases else "heads"
    phase = phases.get(name, {})
    mode = phase.get("mode", "caft")
    if "eval_after" in phase:
        start, end, prefix = phase.get("eval_before", {}), phase["eval_after"], "eval_"
        measured_on = f"{phase.get('eval_rows', 0)} held-out rows"
    else:
        logs = [entry for entry in phase.get("log_history", []) if "loss" in entry and "head1_loss" in entry]
        start, end = (logs[0], logs[-1]) if logs else ({}, {})
        prefix, measured_on = "", "training batches (first and last log)"

    rows = []
    for k in range(1, num_heads + 2):
        if k == 1:
            weight = 0.0 if mode == "heads" else 1.0
        elif mode == "heads":
            weight = caft_config.decay ** (k - 1)
        else:
            weight = caft_config.heads_coefficient * caft_config.decay ** (k - 1)
        rows.append(
            {
                "head": k,
                "predicts": "t+1 (next token)" if k == 1 else f"t+{k}",
                "weight": weight,
                "loss_start": start.get(f"{prefix}head{k}_loss"),
                "loss_end": end.get(f"{prefix}head{k}_loss"),
                "acc_start": start.get(f"{prefix}head{k}_acc"),
                "acc_end": end.get(f"{prefix}head{k}_acc"),
            }
        )
    return {
        "phase": name,
        "mode": mode,
        "measured_on": measured_on,
        "resumed": bool(phase.get("resumed_from")),
        "rows": rows,
    }


WEIGHT_NOTES = {
    "caft": "weight: loss weight at s(t) = 1, that is 1 for the next-token head and beta * gamma^(k-1) "
    "for head k",
    "ntp": "next-token baseline: no auxiliary heads",
    "heads": "weight: gamma^(k-1) in the head-training loss; the next-token head is reported, not trained",
}


def format_summary(summary: dict[str, Any]) -> str:
    """Render the per-head summary as a fixed-width text table with notes."""

    def number(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.4f}"

    header = (
        f"{'head':>4}  {'predicts':<17} {'weight':>7}  {'loss start':>10} {'loss end':>9}  "
        f"{'acc start':>9} {'acc end':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in summary["rows"]:
        lines.append(
            f"{row['head']:>4}  {row['predicts']:<17} {row['weight']:>7.3g}  "
            f"{number(row['loss_start']):>10} {number(row['loss_end']):>9}  "
            f"{number(row['acc_start']):>9} {number(row['acc_end']):>8}"
        )
    lines.append(f"Measured on {summary['measured_on']}, before and after the {summary['phase']} phase.")
    lines.append(WEIGHT_NOTES[summary["mode"]] + ".")
    if summary["resumed"]:
        lines.append("The run was resumed, so the start columns were not measured (n/a).")
    return "\n".join(lines)
