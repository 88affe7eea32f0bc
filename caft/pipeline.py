"""The `caft finetune` and `caft train-heads` jobs: data, heads, training and export in one place.

`run_finetune` goes through the whole flow:
1. load the base model and tokenizer, and tokenize the data with labels on assistant tokens;
2. attach auxiliary heads (new, or pretrained ones from `heads`);
3. optionally train the heads with the trunk frozen ("heads" mode);
4. fine-tune with LoRA or fully, in "caft" mode (or "ntp", the next-token baseline);
5. export a plain Hugging Face model without heads, the heads, and `metrics.json`.

Every step logs progress. The returned `RunResult` contains the per-head summary that the CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .config import CAFTConfig
from .model import CAFTModel

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FinetuneConfig:
    """Settings of a `caft finetune` or `caft train-heads` run (the CAFTConfig fields come apart)."""

    # Model and data
    model: str = field(default="", metadata={"help": "Base model: a local folder or a Hugging Face Hub id."})
    data: str = field(
        default="",
        metadata={"help": "Training data, JSON or JSONL (conversation, messages, Alpaca or prompt/completion rows)."},
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data file; overrides eval_rows."})
    eval_rows: int = field(
        default=0, metadata={"help": "Rows of `data` held out for evaluation when eval_data is unset (rows)."}
    )
    head_data: str | None = field(
        default=None,
        metadata={
            "help": "Data for the head-training phase in one of the four standard shapes, ideally the "
            "model's own answers (default: data)."
        },
    )
    prompt_field: str | None = field(
        default=None, metadata={"help": "Row field used as the user prompt, for data in other shapes (e.g. question)."}
    )
    completion_field: str | None = field(
        default=None, metadata={"help": "Row field used as the assistant answer, with prompt_field (e.g. answer)."}
    )
    max_rows: int | None = field(default=None, metadata={"help": "Read at most this many rows of each data file (rows)."})
    chat_template: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the tokenizer's, else the plain template), 'model' (the tokenizer's, or fail), "
            "'plain', or a .jinja file."
        },
    )
    max_length: int = field(default=512, metadata={"help": "Longer rows are truncated (tokens)."})
    output_dir: str = field(default="outputs/caft", metadata={"help": "Folder for the model, heads, metrics and checkpoints."})
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: 'auto' (as saved), 'float32', 'bfloat16' or 'float16'."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed for initialisation, data order and splits."})

    # Heads
    heads: str | None = field(
        default=None, metadata={"help": "Pretrained heads (folder or Hub id) instead of new ones."}
    )
    heads_allow_other_base: bool = field(
        default=False, metadata={"help": "Load heads recorded for a differently named model with the same shapes."}
    )
    head_train_steps: int = field(
        default=0, metadata={"help": "Head-training steps before fine-tuning, trunk frozen (optimizer steps; 0 skips)."}
    )
    head_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of head training."})
    train_heads: bool = field(
        default=False, metadata={"help": "Also update the heads during CAFT fine-tuning (more optimizer memory)."}
    )

    # Fine-tuning
    mode: str = field(default="caft", metadata={"help": "'caft' (multi-token loss) or 'ntp' (next-token baseline)."})
    method: str = field(default="lora", metadata={"help": "'lora' or 'full' fine-tuning."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "'all-linear' (every linear layer but the unembedding) or comma-separated module names."},
    )
    freeze_unembedding: bool = field(default=False, metadata={"help": "Full fine-tuning: keep lm_head frozen."})
    export: str = field(
        default="merged", metadata={"help": "LoRA export: 'merged' (plain model) or 'adapter' (PEFT adapter)."}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate of fine-tuning."})
    max_steps: int = field(default=-1, metadata={"help": "Fine-tuning optimizer steps; -1 uses num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training data (epochs)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Rows per batch per device (rows)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps with linear warm-up (fraction)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss and per-head metrics every N steps."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (default: only before and after)."})
    save_steps: int = field(default=500, metadata={"help": "Write a resumable checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept per phase."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute trunk activations in backward."})
    report_to: str = field(default="none", metadata={"help": "Logging integrations, e.g. 'tensorboard,wandb'."})
    resume: bool = field(
        default=False,
        metadata={"help": "Resume from the latest checkpoint in output_dir, and reuse heads trained there."},
    )
    trainer: dict = field(
        default_factory=dict,
        metadata={"help": "Extra transformers.TrainingArguments, e.g. {bf16: true} (YAML mapping)."},
    )

    def __post_init__(self) -> None:
        choices = {"mode": ("caft", "ntp"), "method": ("lora", "full"), "export": ("merged", "adapter")}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} must be one of {list(accepted)}, got {getattr(self, name)!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {self.dtype!r}")
        for name in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ValueError("prompt_field and completion_field must be given together")
        if not isinstance(self.trainer, dict):
            raise ValueError(f"trainer must be a mapping of TrainingArguments, got {self.trainer!r}")


@dataclass
class RunResult:
    """Outputs of a run: output paths, the per-head summary and the metrics file content."""

    output_dir: Path
    model_dir: Path | None
    heads_dir: Path | None
    metrics_path: Path
    summary: list[dict[str, Any]]
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Loading


def load_model_and_tokenizer(config: FinetuneConfig):
    """Load the base causal LM and its tokenizer from a folder or the Hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = config.model
    if not source:
        raise ValueError("no model given: set `model` in the config or pass --model")
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_local and not Path(source).exists():
        raise FileNotFoundError(
            f"model folder not found: {source} (check the path, or set CAFT_ASSETS to the assets folder)"
        )
    dtype = "auto" if config.dtype == "auto" else DTYPES[config.dtype]
    logger.info("Loading model %s (dtype %s)", source, config.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        if Path(source).exists():
            raise
        offline = " HF_HUB_OFFLINE is set, so only models already in the local cache load." if os.environ.get(
            "HF_HUB_OFFLINE"
        ) else ""
        raise FileNotFoundError(
            f"model {source!r} is not a local folder and could not be loaded from the Hugging Face Hub.{offline} "
            f"({error})"
        ) from error
    return model, tokenizer


def load_datasets(
    config: FinetuneConfig, tokenizer, chat_template: str
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """Tokenize the training data with the resolved `chat_template` text and split off (or load) the evaluation data."""
    from .data import build_supervised_dataset

    def build(path: str) -> tuple[Dataset, Any]:
        return build_supervised_dataset(
            path,
            tokenizer,
            config.max_length,
            chat_template=chat_template,
            prompt_field=config.prompt_field,
            completion_field=config.completion_field,
            max_rows=config.max_rows,
        )

    if not config.data:
        raise ValueError("no training data given: set `data` in the config or pass --data")
    train, train_stats = build(config.data)
    stats = {"train": asdict(train_stats)}

    evaluation: Dataset | None = None
    if config.eval_data:
        evaluation, eval_stats = build(config.eval_data)
        stats["eval"] = asdict(eval_stats)
    elif config.eval_rows > 0:
        if config.eval_rows >= len(train):
            raise ValueError(
                f"eval_rows={config.eval_rows} leaves no training rows out of {len(train)}; lower it"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed)).tolist()
        evaluation = Subset(train, order[: config.eval_rows])
        train = Subset(train, order[config.eval_rows :])
    stats["train_rows"] = len(train)
    stats["eval_rows"] = len(evaluation) if evaluation is not None else 0
    logger.info("Data: %d training rows, %d evaluation rows", stats["train_rows"], stats["eval_rows"])
    return train, evaluation, stats


# ---------------------------------------------------------------------------------------------
# Training phases


def training_arguments(config: FinetuneConfig, phase: str, learning_rate: float, max_steps: int, has_eval: bool):
    from transformers import TrainingArguments

    values: dict[str, Any] = dict(
        output_dir=str(Path(config.output_dir) / "checkpoints" / phase),
        learning_rate=learning_rate,
        max_steps=max_steps,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,  # transformers 5 reads a value below 1 as a fraction of steps
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if (has_eval and config.eval_steps) else "no",
        eval_steps=config.eval_steps,
        report_to=[name.strip() for name in config.report_to.split(",") if name.strip() and name.strip() != "none"]
        or "none",
        seed=config.seed,
        remove_unused_columns=False,
        activation_checkpointing=config.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
    )
    values.update(config.trainer)
    return TrainingArguments(**values)


def latest_checkpoint(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder))


def run_phase(
    caft_model: CAFTModel,
    config: FinetuneConfig,
    phase: str,
    mode: str,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    collator,
    tokenizer,
    learning_rate: float,
    max_steps: int,
    train_heads: bool = False,
) -> dict[str, Any]:
    """Train one phase and return its log history and the evaluation before and after."""
    from .trainer import CAFTTrainer

    args = training_arguments(config, phase, learning_rate, max_steps, eval_dataset is not None)
    trainer = CAFTTrainer(
        model=caft_model,
        mode=mode,
        train_heads=train_heads,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    resume_from = latest_checkpoint(Path(args.output_dir)) if config.resume else None
    if resume_from:
        logger.info("Resuming %s from %s", phase, resume_from)

    result: dict[str, Any] = {"mode": mode}
    if eval_dataset is not None and not resume_from:
        logger.info("Evaluating before %s", phase)
        result["eval_before"] = trainer.evaluate()
    logger.info("Training phase %r in mode %r", phase, mode)
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    result["train"] = train_output.metrics
    if eval_dataset is not None:
        logger.info("Evaluating after %s", phase)
        result["eval_after"] = trainer.evaluate()
    result["log_history"] = trainer.state.log_history
    return result


# ---------------------------------------------------------------------------------------------
# Outputs


def _replace_directory(target: Path, write) -> None:
    """Write a folder with `write(temporary_folder)`, then swap it in, so no half-written folder remains."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(temporary)
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_json(path: Path, content: Any) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        json.dump(content, stream, indent=2, default=str)
        stream.write("\n")
    os.replace(temporary, path)


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

        def write(folder: Path) -> None:
            caft_model.model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

    else:
        target = Path(config.output_dir) / "model"
        plain_model = caft_model.merge_and_unload()

        def write(folder: Path) -> None:
            plain_model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

    _replace_directory(target, write)
    logger.info("Saved the fine-tuned model (no heads) to %s", target)
    return target


def save_heads_folder(caft_model: CAFTModel, target: Path) -> Path:
    from .heads_io import save_heads

    _replace_directory(target, lambda folder: save_heads(caft_model, folder))
    return target


def head_summary(phases: dict[str, Any], caft_config: CAFTConfig, num_heads: int) -> list[dict[str, Any]]:
    """Tabulate each head's loss and top-1 accuracy at the start and the end of fine-tuning.

    Uses the held-out evaluation when there is one, else the first and last training logs.
    """
    phase = phases.get("finetune") or phases.get("heads") or {}
    if "eval_before" in phase or "eval_after" in phase:
        start, end, prefix, source = phase.get("eval_before", {}), phase.get("eval_after", {}), "eval_", "held-out"
    else:
        logs = [entry for entry in phase.get("log_history", []) if "head1_loss" in entry or "head2_loss" in entry]
        start, end = (logs[0], logs[-1]) if logs else ({}, {})
        prefix, source = "", "training batches"

    rows = []
    for k in range(1, num_heads + 2):
        weight = 1.0 if k == 1 else caft_config.decay ** (k - 1)
        row = {
            "head": k,
            "predicts": "t+1 (next token)" if k == 1 else f"t+{k}",
            "relative_weight": round(weight, 6),
            "loss_start": start.get(f"{prefix}head{k}_loss"),
            "loss_end": end.get(f"{prefix}head{k}_loss"),
            "acc_start": start.get(f"{prefix}head{k}_acc"),
            "acc_end": end.get(f"{prefix}head{k}_acc"),
            "measured_on": source,
        }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Jobs


def _attach_heads(model, config: FinetuneConfig, caft_config: CAFTConfig) -> CAFTModel:
    from .heads_io import load_heads
    from .model import add_auxiliary_heads

    reused = Path(config.output_dir) / "heads_trained"
    if config.resume and (reused / "heads_config.json").is_file():
        logger.info("Resuming with the heads trained earlier in %s", reused)
        return load_heads(model, reused)
    if config.heads:
        return load_heads(model, config.heads, allow_other_base=config.heads_allow_other_base)
    return add_auxiliary_heads(model, caft_config)


def _prepare(config: FinetuneConfig):
    from transformers import set_seed

    from .data import CAFTDataCollator, resolve_chat_template, resolve_pad_token_id

    set_seed(config.seed)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(config)
    chat_template = resolve_chat_template(tokenizer, config.chat_template)
    train, evaluation, stats = load_datasets(config, tokenizer, chat_template)
    collator = CAFTDataCollator(pad_token_id=resolve_pad_token_id(tokenizer))
    return model, tokenizer, chat_template, train, evaluation, stats, collator


def _head_phase_steps(config: FinetuneConfig) -> int:
    return config.head_train_steps if config.head_train_steps > 0 else -1


def run_finetune(config: FinetuneConfig, caft_config: CAFTConfig) -> RunResult:
    """Run the whole `caft finetune` flow; see the module docstring."""
    from .lora import apply_lora, prepare_full_finetuning

    model, tokenizer, chat_template, train, evaluation, stats, collator = _prepare(config)
    output_dir = Path(config.output_dir)
    phases: dict[str, Any] = {}

    if config.mode == "ntp":
        # The baseline runs the same model wrapper and trainer, without heads to carry around.
        from .model import add_auxiliary_heads

        if config.heads:
            logger.warning("mode 'ntp' trains no heads: ignoring heads=%s", config.heads)
        caft_model = add_auxiliary_heads(model, CAFTConfig(**{**caft_config.to_dict(), "num_aux_heads": 0}))
    else:
        caft_model = _attach_heads(model, config, caft_config)

    heads_trained = output_dir / "heads_trained"
    if config.mode == "caft" and config.head_train_steps > 0 and not (config.resume and heads_trained.is_dir()):
        head_train = train
        if config.head_data:
            # Head data comes in one of the four standard shapes (for example `caft distill` output),
            # so the task's prompt_field/completion_field mapping does not apply to it.
            head_config = FinetuneConfig(
                **{**asdict(config), "data": config.head_data, "eval_rows": 0,
                   "prompt_field": None, "completion_field": None}
            )
            head_train, _, head_stats = load_datasets(head_config, tokenizer, chat_template)
            stats["head_data"] = head_stats["train"]
        phases["heads"] = run_phase(
            caft_model, config, "heads", "heads", head_train, evaluation, collator, tokenizer,
            learning_rate=config.head_learning_rate, max_steps=_head_phase_steps(config),
        )
        if is_main_process():
            save_heads_folder(caft_model, heads_trained)
        wait_for_everyone()

    if config.method == "lora":
        targets: str | list[str] = config.lora_target_modules
        if targets != "all-linear":
            targets = [name.strip() for name in targets.split(",") if name.strip()]
        apply_lora(caft_model, config.lora_r, config.lora_alpha, config.lora_dropout, targets)
    else:
        prepare_full_finetuning(caft_model, config.freeze_unembedding)

    phases["finetune"] = run_phase(
        caft_model, config, "finetune", config.mode, train, evaluation, collator, tokenizer,
        learning_rate=config.learning_rate, max_steps=config.max_steps, train_heads=config.train_heads,
    )

    return _write_outputs(caft_model, config, phases, stats, tokenizer, chat_template, export=True)


def run_train_heads(config: FinetuneConfig, caft_config: CAFTConfig) -> RunResult:
    """Train auxiliary heads with the trunk frozen and save them (the `caft train-heads` job)."""
    model, tokenizer, chat_template, train, evaluation, stats, collator = _prepare(config)
    caft_model = _attach_heads(model, config, caft_config)
    if len(caft_model.heads) == 0:
        raise ValueError("num_aux_heads is 0: there are no heads to train")

    phases = {
        "heads": run_phase(
            caft_model, config, "heads", "heads", train, evaluation, collator, tokenizer,
            learning_rate=config.head_learning_rate, max_steps=_head_phase_steps(config),
        )
    }
    return _write_outputs(caft_model, config, phases, stats, tokenizer, chat_template=None, export=False)


def _write_outputs(
    caft_model: CAFTModel,
    config: FinetuneConfig,
    phases: dict[str, Any],
    stats: dict[str, Any],
    tokenizer,
    chat_template: str | None,
    export: bool,
) -> RunResult:
    """Save the heads, the exported model (when `export`) and metrics.json, from the main process only."""
    output_dir = Path(config.output_dir)
    heads_dir = output_dir / "heads" if len(caft_model.heads) > 0 else None
    model_dir = None
    summary = head_summary(phases, caft_model.caft_config, len(caft_model.heads))
    metrics = {
        "config": asdict(config),
        "caft_config": caft_model.caft_config.to_dict(),
        "data": stats,
        "phases": phases,
        "summary": summary,
    }
    metrics_path = output_dir / "metrics.json"
    # Under `accelerate launch` every process reaches this point with the same weights, and one
    # writer avoids processes replacing each other's folders.
    if is_main_process():
        if heads_dir is not None:
            save_heads_folder(caft_model, heads_dir)
        if export:
            model_dir = export_model(caft_model, tokenizer, config, chat_template)
        write_json(metrics_path, metrics)
    wait_for_everyone()
    return RunResult(output_dir, model_dir, heads_dir, metrics_path, summary, metrics)


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def config_fields() -> list:
    """Fields of `FinetuneConfig` then `CAFTConfig`, in the order the CLI lists them."""
    return list(fields(FinetuneConfig)) + list(fields(CAFTConfig))


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Render the per-head summary as a fixed-width text table."""

    def number(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4f}"

    header = f"{'head':>4}  {'predicts':<17} {'weight':>7}  {'loss start':>10} {'loss end':>9}  {'acc start':>9} {'acc end':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['head']:>4}  {row['predicts']:<17} {row['relative_weight']:>7.3f}  "
            f"{number(row['loss_start']):>10} {number(row['loss_end']):>9}  "
            f"{number(row['acc_start']):>9} {number(row['acc_end']):>8}"
        )
    if rows:
        lines.append(f"(measured on {rows[0]['measured_on']}; weight is gamma^(k-1) relative to beta)")
    return "\n".join(lines)
