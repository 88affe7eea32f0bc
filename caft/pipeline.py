"""The `caft finetune` and `caft train-heads` jobs: data, heads, training and export in one place.

`run_finetune` goes through the whole flow:
1. load the tokenizer and tokenize the data with labels on assistant tokens (before the weights,
   so bad data fails fast), then load the base model;
2. attach auxiliary heads (new, or pretrained ones from `heads`);
3. optionally train the heads with the trunk frozen ("heads" mode);
4. fine-tune with LoRA or fully, in "caft" mode (or "ntp", the next-token baseline);
5. export a plain Hugging Face model without heads, the heads, and `metrics.json`.

Every step logs progress. The returned `RunResult` contains the per-head summary that the CLI prints.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .baselines import baseline_accuracies
from .config import STRUCTURE_FIELDS, CAFTConfig
from .model import CAFTModel
from .run_config import DTYPES, FinetuneConfig
from .run_outputs import (
    CHECKPOINTS,
    HEADS_TRAINED,
    export_model,
    head_summary,
    is_main_process,
    prepare_output_dir,
    save_heads_folder,
    wait_for_everyone,
    write_json,
)

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Outputs of a run: output paths, the per-head summary and the metrics file content."""

    output_dir: Path
    model_dir: Path | None
    heads_dir: Path | None
    metrics_path: Path
    summary: dict[str, Any]
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Loading


def _check_model_source(source: str) -> None:
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_local and not Path(source).exists():
        raise FileNotFoundError(
            f"model folder not found: {source} (check the path, or set CAFT_ASSETS to the assets folder)"
        )


def _not_found_on_hub(source: str, error: OSError) -> FileNotFoundError:
    offline = ""
    if os.environ.get("HF_HUB_OFFLINE"):
        offline = " HF_HUB_OFFLINE is set, so only models already in the local cache load."
    return FileNotFoundError(
        f"model {source!r} is not a local folder and could not be loaded from the Hugging Face Hub."
        f"{offline} ({error})"
    )


def load_tokenizer(config: FinetuneConfig):
    """Load the base model's tokenizer from a folder or the Hub."""
    from transformers import AutoTokenizer

    _check_model_source(config.model)
    try:
        return AutoTokenizer.from_pretrained(config.model)
    except OSError as error:
        if Path(config.model).exists():
            raise
        raise _not_found_on_hub(config.model, error) from error


def load_model(config: FinetuneConfig):
    """Load the base causal LM in the configured dtype."""
    from transformers import AutoModelForCausalLM

    dtype = "auto" if config.dtype == "auto" else DTYPES[config.dtype]
    logger.info("Loading model %s (dtype %s)", config.model, config.dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    except OSError as error:
        if Path(config.model).exists():
            raise
        raise _not_found_on_hub(config.model, error) from error


def load_datasets(
    config: FinetuneConfig, tokenizer, chat_template: str, name: str = "task"
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """Tokenize `config.data` with the resolved `chat_template` text and split off (or load) evaluation data."""
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

    train, train_stats = build(config.data)
    stats: dict[str, Any] = {"train": asdict(train_stats)}

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
    logger.info(
        "%s data: %d training rows, %d evaluation rows",
        name.capitalize(),
        stats["train_rows"],
        stats["eval_rows"],
    )
    return train, evaluation, stats


# ---------------------------------------------------------------------------------------------
# Training phases


def training_arguments(
    config: FinetuneConfig,
    phase: str,
    learning_rate: float,
    max_steps: int,
    has_eval: bool,
    keep_best: bool = False,
):
    """Build TrainingArguments for one phase; `keep_best` ends on the checkpoint with the lowest eval loss."""
    from transformers import TrainingArguments

    report_to = [name.strip() for name in config.report_to.split(",") if name.strip() not in ("", "none")]
    values: dict[str, Any] = dict(
        output_dir=str(Path(config.output_dir) / CHECKPOINTS / phase),
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
        report_to=report_to or "none",
        seed=config.seed,
        remove_unused_columns=False,
        activation_checkpointing=config.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    periodic_eval = has_eval and bool(config.eval_steps)
    if periodic_eval and (keep_best or config.early_stopping_patience):
        # The best checkpoint can only be one that was evaluated, so save at every evaluation.
        values.update(
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            save_steps=config.eval_steps,
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
    keep_best: bool = False,
) -> dict[str, Any]:
    """Train one phase and return its log history and the evaluation before and after.

    With `keep_best` (or early stopping) and periodic evaluation, the phase ends on the checkpoint
    with the lowest held-out loss, and "eval_after" measures that checkpoint.
    """
    from transformers import EarlyStoppingCallback

    from .trainer import CAFTTrainer

    args = training_arguments(config, phase, learning_rate, max_steps, eval_dataset is not None, keep_best)
    callbacks = []
    if config.early_stopping_patience and eval_dataset is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = CAFTTrainer(
        model=caft_model,
        mode=mode,
        train_heads=train_heads,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    resume_from = latest_checkpoint(Path(args.output_dir)) if config.resume else None
    result: dict[str, Any] = {"mode": mode, "eval_rows": len(eval_dataset) if eval_dataset is not None else 0}
    if resume_from:
        logger.info("Resuming phase %r from %s", phase, resume_from)
        result["resumed_from"] = resume_from
    elif eval_dataset is not None:
        logger.info("Evaluating before phase %r", phase)
        result["eval_before"] = trainer.evaluate()

    logger.info("Training phase %r in mode %r", phase, mode)
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    result["train"] = train_output.metrics
    if eval_dataset is not None:
        logger.info("Evaluating after phase %r", phase)
        result["eval_after"] = trainer.evaluate()
    result["log_history"] = trainer.state.log_history
    if trainer.state.best_model_checkpoint:
        result["best_checkpoint"] = trainer.state.best_model_checkpoint
    return result


# ---------------------------------------------------------------------------------------------
# Heads


def attach_heads(model, config: FinetuneConfig, caft_config: CAFTConfig) -> CAFTModel:
    """Attach new heads, load pretrained ones (`config.heads`), or reuse heads trained by an earlier run.

    Loaded heads fix the structure fields (`STRUCTURE_FIELDS`); the loss settings (beta, gamma,
    schedule, chunk size) always come from this run's `caft_config`.
    """
    from .heads_io import load_heads
    from .model import add_auxiliary_heads

    reused = Path(config.output_dir) / HEADS_TRAINED
    if config.resume and (reused / "heads_config.json").is_file():
        logger.info("Resuming with the heads trained earlier in %s", reused)
        caft_model = load_heads(model, reused, allow_other_base=True)
    elif config.heads:
        caft_model = load_heads(model, config.heads, allow_other_base=config.heads_allow_other_base)
        saved = caft_model.caft_config
        ignored = {
            name: getattr(caft_config, name)
            for name in STRUCTURE_FIELDS
            if getattr(caft_config, name) != getattr(saved, name)
        }
        if ignored:
            kept = {name: getattr(saved, name) for name in ignored}
            logger.warning("The loaded heads fix %s; the configured %s do not apply", kept, ignored)
    else:
        return add_auxiliary_heads(model, caft_config)
    caft_model.caft_config = caft_model.caft_config.with_loss_settings_of(caft_config)
    return caft_model


def _warn_about_untrained_heads(config: FinetuneConfig) -> None:
    if config.mode != "caft":
        return
    if config.heads is None and config.head_train_steps == 0 and not config.train_heads:
        logger.warning(
            "CAFT with untrained, frozen heads: heads copied from the last layer predict the next token, "
            "not tokens t+2 and later. Train them first (head_train_steps > 0, or `caft train-heads` "
            "then --heads), or set train_heads"
        )


# ---------------------------------------------------------------------------------------------
# Jobs


def _prepare(config: FinetuneConfig):
    """Check the settings, tokenize the data, claim the output folder, then load the model."""
    from transformers import set_seed

    from .data import CAFTDataCollator, resolve_chat_template, resolve_pad_token_id

    config.check_required()
    set_seed(config.seed)
    tokenizer = load_tokenizer(config)
    chat_template = resolve_chat_template(tokenizer, config.chat_template)
    train, evaluation, stats = load_datasets(config, tokenizer, chat_template)
    collator = CAFTDataCollator(pad_token_id=resolve_pad_token_id(tokenizer))
    prepare_output_dir(config)
    model = load_model(config)
    return model, tokenizer, chat_template, train, evaluation, stats, collator


def _head_phase_steps(config: FinetuneConfig) -> int:
    return config.head_train_steps if config.head_train_steps > 0 else -1


def _train_heads_phase(caft_model, config, tokenizer, chat_template, train, evaluation, collator, stats):
    head_train = train
    if config.head_data:
        # Head data comes in one of the four standard shapes (for example the model's own answers),
        # so the task's prompt_field/completion_field mapping does not apply to it.
        head_config = replace(
            config, data=config.head_data, eval_rows=0, prompt_field=None, completion_field=None
        )
        head_train, _, head_stats = load_datasets(head_config, tokenizer, chat_template, name="head")
        stats["head_data"] = head_stats["train"]
    if config.heads:
        logger.info("Training the loaded heads for %d more steps (head_train_steps)", config.head_train_steps)
    return run_phase(
        caft_model,
        config,
        "heads",
        "heads",
        head_train,
        evaluation,
        collator,
        tokenizer,
        learning_rate=config.head_learning_rate,
        max_steps=_head_phase_steps(config),
    )


def run_finetune(config: FinetuneConfig, caft_config: CAFTConfig) -> RunResult:
    """Run the whole `caft finetune` flow; see the module docstring."""
    from .lora import apply_lora, prepare_full_finetuning
    from .model import add_auxiliary_heads

    _warn_about_untrained_heads(config)
    model, tokenizer, chat_template, train, evaluation, stats, collator = _prepare(config)
    phases: dict[str, Any] = {}

    if config.mode == "ntp":
        # The baseline runs the same model wrapper and trainer, without heads to carry around.
        if config.heads or config.head_train_steps:
            logger.warning("mode 'ntp' uses no heads: heads and head_train_steps are ignored")
        caft_model = add_auxiliary_heads(model, replace(caft_config, num_aux_heads=0))
    else:
        caft_model = attach_heads(model, config, caft_config)
        heads_trained = Path(config.output_dir) / HEADS_TRAINED
        reuse = config.resume and heads_trained.is_dir()
        if config.head_train_steps > 0 and not reuse:
            phases["heads"] = _train_heads_phase(
                caft_model, config, tokenizer, chat_template, train, evaluation, collator, stats
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
        caft_model,
        config,
        "finetune",
        config.mode,
        train,
        evaluation,
        collator,
        tokenizer,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps,
        train_heads=config.train_heads,
    )
    return _write_outputs(caft_model, config, phases, stats, tokenizer, chat_template, export=True)


def run_train_heads(config: FinetuneConfig, caft_config: CAFTConfig) -> RunResult:
    """Train auxiliary heads with the trunk frozen and save them (the `caft train-heads` job)."""
    if caft_config.num_aux_heads == 0:
        raise ValueError("num_aux_heads is 0: there are no heads to train")
    model, tokenizer, chat_template, train, evaluation, stats, collator = _prepare(config)
    caft_model = attach_heads(model, config, caft_config)
    if evaluation is None:
        logger.warning(
            "No held-out split: per-head accuracy before and after training is not measured. "
            "Set eval_rows or eval_data"
        )
    phases = {
        "heads": run_phase(
            caft_model,
            config,
            "heads",
            "heads",
            train,
            evaluation,
            collator,
            tokenizer,
            learning_rate=config.head_learning_rate,
            max_steps=_head_phase_steps(config),
            keep_best=True,
        )
    }
    extra = held_out_head_metrics(phases["heads"], len(caft_model.heads))
    if evaluation is not None:
        vocab_size = caft_model.base_model.get_output_embeddings().weight.shape[0]
        offsets = list(range(2, len(caft_model.heads) + 2))
        extra["baseline"] = baseline_accuracies(train, evaluation, offsets, vocab_size)
        _log_head_accuracies(extra)
    return _write_outputs(
        caft_model, config, phases, stats, tokenizer, chat_template, export=False, extra_metrics=extra
    )


def held_out_head_metrics(phase: dict[str, Any], num_heads: int) -> dict[str, Any]:
    """Collect held-out top-1, top-5 and loss per auxiliary head (head 2 first) before and after training.

    Returns {"initial": {...}, "final": {...}}, each with lists "top1", "top5" and "loss"; a key is
    missing when that evaluation did not run.
    """
    metrics: dict[str, Any] = {}
    for key, evaluation in (("initial", phase.get("eval_before")), ("final", phase.get("eval_after"))):
        if not evaluation:
            continue
        metrics[key] = {
            name: [evaluation.get(f"eval_head{k}_{suffix}") for k in range(2, num_heads + 2)]
            for name, suffix in (("top1", "acc"), ("top5", "top5"), ("loss", "loss"))
        }
    return metrics


def _log_head_accuracies(metrics: dict[str, Any]) -> None:
    baseline = metrics["baseline"]
    for index, offset in enumerate(baseline["offsets"]):
        initial = metrics.get("initial", {}).get("top1")
        final = metrics.get("final", {}).get("top1")
        logger.info(
            "Head t+%d held-out top-1: initial %s, final %s, skip-bigram baseline %.4f",
            offset,
            "n/a" if initial is None else f"{initial[index]:.4f}",
            "n/a" if final is None else f"{final[index]:.4f}",
            baseline["skip_bigram_top1"][index],
        )


def _write_outputs(
    caft_model: CAFTModel,
    config: FinetuneConfig,
    phases: dict[str, Any],
    stats: dict[str, Any],
    tokenizer,
    chat_template: str,
    export: bool,
    extra_metrics: dict[str, Any] | None = None,
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
        **(extra_metrics or {}),
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
