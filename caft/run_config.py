"""`FinetuneConfig`: the settings of a `caft finetune` or `caft train-heads` run.

The field help doubles as CLI help. Fields marked `finetune_only` are left out of
`caft train-heads --help`, because head training does not use them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .config import CAFTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FinetuneConfig:
    """Settings of a `caft finetune` or `caft train-heads` run (the CAFTConfig fields come apart)."""

    # Model and data
    model: str = field(default="", metadata={"help": "Base model: a local folder or a Hugging Face Hub id."})
    data: str = field(
        default="",
        metadata={
            "help": "Training data, JSON or JSONL (conversation, messages, Alpaca or prompt/completion rows)."
        },
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data file; overrides eval_rows."})
    eval_rows: int = field(
        default=0, metadata={"help": "Rows of `data` held out for evaluation when eval_data is unset (rows)."}
    )
    head_data: str | None = field(
        default=None,
        metadata={
            "finetune_only": True,
            "help": "Data for the head-training phase in one of the four standard shapes, ideally the "
            "model's own answers (default: data).",
        },
    )
    prompt_field: str | None = field(
        default=None,
        metadata={"help": "Row field used as the user prompt, for data in other shapes (e.g. question)."},
    )
    completion_field: str | None = field(
        default=None,
        metadata={"help": "Row field used as the assistant answer, with prompt_field (e.g. answer)."},
    )
    max_rows: int | None = field(
        default=None,
        metadata={"help": "Read at most this many rows of each data file, head_data included (rows)."},
    )
    chat_template: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the tokenizer's, else the plain template), 'model' (the tokenizer's, or fail), "
            "'plain', or a .jinja file."
        },
    )
    max_length: int = field(default=512, metadata={"help": "Longer rows are truncated (tokens)."})
    output_dir: str = field(
        default="outputs/caft", metadata={"help": "Folder for the model, heads, metrics and checkpoints."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: 'auto' (as saved), 'float32', 'bfloat16' or 'float16'."},
    )
    seed: int = field(default=42, metadata={"help": "Random seed for initialisation, data order and splits."})

    # Heads
    heads: str | None = field(
        default=None, metadata={"help": "Pretrained heads (folder or Hub id) instead of new ones."}
    )
    heads_allow_other_base: bool = field(
        default=False,
        metadata={"help": "Load heads recorded for a differently named model with the same shapes."},
    )
    head_train_steps: int = field(
        default=0,
        metadata={
            "help": "Head-training steps with the trunk frozen, before fine-tuning; with `heads`, they continue "
            "training the loaded heads (optimizer steps; 0 skips)."
        },
    )
    head_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of head training."})
    train_heads: bool = field(
        default=False,
        metadata={
            "finetune_only": True,
            "help": "Also update the heads during CAFT fine-tuning (more optimizer memory).",
        },
    )

    # Fine-tuning
    mode: str = field(
        default="caft",
        metadata={"finetune_only": True, "help": "'caft' (multi-token loss) or 'ntp' (next-token baseline)."},
    )
    method: str = field(
        default="lora", metadata={"finetune_only": True, "help": "'lora' or 'full' fine-tuning."}
    )
    lora_r: int = field(default=16, metadata={"finetune_only": True, "help": "LoRA rank."})
    lora_alpha: int = field(
        default=32, metadata={"finetune_only": True, "help": "LoRA alpha (scale = alpha / r)."}
    )
    lora_dropout: float = field(
        default=0.05, metadata={"finetune_only": True, "help": "Dropout on the LoRA input."}
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "finetune_only": True,
            "help": "'all-linear' (every linear layer but the unembedding) or comma-separated module names.",
        },
    )
    freeze_unembedding: bool = field(
        default=False, metadata={"finetune_only": True, "help": "Full fine-tuning: keep lm_head frozen."}
    )
    export: str = field(
        default="merged",
        metadata={
            "finetune_only": True,
            "help": "LoRA export: 'merged' (plain model) or 'adapter' (PEFT adapter).",
        },
    )
    learning_rate: float = field(
        default=2e-4, metadata={"finetune_only": True, "help": "Peak learning rate of fine-tuning."}
    )
    max_steps: int = field(
        default=-1,
        metadata={"finetune_only": True, "help": "Fine-tuning optimizer steps; -1 uses num_train_epochs."},
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training data (epochs)."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Rows per batch per device (rows)."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Share of steps with linear warm-up (fraction)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss and per-head metrics every N steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N steps (default: only before and after)."}
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={
            "help": "Stop after this many evaluations without a lower held-out loss, and keep the best "
            "checkpoint (evaluations; 0 disables; needs eval_steps and evaluation data)."
        },
    )
    save_steps: int = field(default=500, metadata={"help": "Write a resumable checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept per phase."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute trunk activations in backward."}
    )
    report_to: str = field(
        default="none", metadata={"help": "Logging integrations, e.g. 'tensorboard,wandb'."}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Resume the earlier run in output_dir from its latest checkpoint, reusing the heads it "
            "trained. The run's model, data and settings must match."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete checkpoints of an earlier run in output_dir and start over (ignored with resume)."
        },
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
        for name in (
            "max_length",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ValueError("prompt_field and completion_field must be given together")
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("early_stopping_patience needs eval_steps: set how often to evaluate")
        if self.early_stopping_patience and not (self.eval_data or self.eval_rows):
            raise ValueError("early_stopping_patience needs evaluation data: set eval_data or eval_rows")
        if not isinstance(self.trainer, dict):
            raise ValueError(f"trainer must be a mapping of TrainingArguments, got {self.trainer!r}")
        self._check_trainer_arguments()

    def _check_trainer_arguments(self) -> None:
        """Reject `trainer` keys that TrainingArguments does not have, before anything is loaded."""
        from dataclasses import fields as dataclass_fields

        from transformers import TrainingArguments

        accepted = {item.name for item in dataclass_fields(TrainingArguments)}
        unknown = sorted(set(self.trainer) - accepted)
        if unknown:
            close = {name: difflib.get_close_matches(name, accepted, n=1) for name in unknown}
            hints = ", ".join(
                f"{name!r}" + (f" (did you mean {match[0]!r}?)" if match else "")
                for name, match in close.items()
            )
            raise ValueError(f"trainer: unknown TrainingArguments {hints}")

    def check_required(self) -> None:
        """Raise `ValueError` when the model or the training data is missing."""
        if not self.model:
            raise ValueError("no model given: set `model` in the config or pass --model")
        if not self.data:
            raise ValueError("no training data given: set `data` in the config or pass --data")

    def identity(self) -> dict[str, Any]:
        """Return the settings that make two runs the same run, for checking a resumed run against its checkpoints."""
        names = (
            "model",
            "data",
            "eval_data",
            "eval_rows",
            "head_data",
            "prompt_field",
            "completion_field",
            "max_rows",
            "chat_template",
            "max_length",
            "seed",
            "heads",
            "mode",
            "method",
            "lora_r",
            "lora_alpha",
            "lora_target_modules",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
        )
        return {name: getattr(self, name) for name in names}


def config_fields(command: str = "finetune") -> list:
    """Fields of `FinetuneConfig` then `CAFTConfig` that `command` uses, in the order the CLI lists them."""
    run_fields = [
        item
        for item in fields(FinetuneConfig)
        if command == "finetune" or not item.metadata.get("finetune_only")
    ]
    return run_fields + list(fields(CAFTConfig))
