"""`CAFTTrainer`: a `transformers.Trainer` that trains a `CAFTModel` in one of three modes.

- "caft": next-token loss plus the weighted auxiliary heads' losses, with the schedule s(t)
  driven by the trainer's own step counter.
- "ntp": next-token loss only, through the same model, data and code path: the fair baseline.
- "heads": trunk and unembedding frozen, only the heads train, on sum_k gamma^(k-1) CE_k.

The subclass overrides `compute_loss` (the hook `Trainer` documents for custom losses) and adds
per-head metrics to every log, so `report_to` integrations (TensorBoard, W&B, ...) receive
`head{k}_loss`, `head{k}_acc` (top-1) and `head{k}_top5` for the head predicting token t+k
(k = 1 is the next-token head).
Checkpoints store the base model (or its LoRA adapter) and the heads, and resuming restores both.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer

from .heads_io import load_heads, save_heads
from .model import MODES, CAFTModel

logger = logging.getLogger(__name__)

HEADS_SUBFOLDER = "heads"


class HeadMetrics:
    """Running sums of per-head loss, correct top-1 and top-5 predictions and targets between two logs."""

    # Rows of the (4, n) sums: loss x targets, top-1 hits, top-5 hits, targets.
    NAMES = ("loss", "acc", "top5")

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # (4, n)

    def add(self, outputs) -> None:
        """Add one batch's `CAFTOutput` (head_losses, head_accuracies, head_top5_accuracies, head_num_targets)."""
        counts = outputs.head_num_targets.detach().double()
        # Heads that did not run hold NaN; they contribute nothing (count 0) rather than NaN.
        ran = ~torch.isnan(outputs.head_losses.detach())
        counts = torch.where(ran, counts, torch.zeros_like(counts))
        rows = [
            torch.nan_to_num(values.detach().double()) * counts
            for values in (outputs.head_losses, outputs.head_accuracies, outputs.head_top5_accuracies)
        ]
        batch = torch.stack(rows + [counts])  # (4, n)
        self.sums = batch if self.sums is None else self.sums + batch

    def pop(self, reduce=None, prefix: str = "") -> dict[str, float]:
        """Return the means since the last call and reset; `reduce` sums across processes."""
        if self.sums is None:
            return {}
        totals = self.sums if reduce is None else reduce(self.sums)
        self.sums = None
        metrics: dict[str, float] = {}
        for index in range(totals.shape[1]):
            count = totals[3, index].item()
            if count == 0:
                continue
            for row, name in enumerate(self.NAMES):
                metrics[f"{prefix}head{index + 1}_{name}"] = round(totals[row, index].item() / count, 6)
        return metrics


class CAFTTrainer(Trainer):
    """A `Trainer` for `CAFTModel` with modes "caft", "ntp" and "heads".

    Args:
        model: a `CAFTModel` (from `add_auxiliary_heads` or `load_heads`).
        mode: "caft", "ntp" or "heads" (see the module docstring).
        train_heads: in "caft" mode, also update the heads. Off by default: the heads were trained
            beforehand, and a trainable transformer head per auxiliary prediction would add a full
            decoder layer's optimizer state each, which LoRA fine-tuning is meant to avoid.
        kwargs: everything `transformers.Trainer` takes (args, datasets, data_collator, ...).

    Example:
        >>> trainer = CAFTTrainer(model=caft_model, mode="caft", args=TrainingArguments("out"),
        ...                       train_dataset=dataset, data_collator=collator)
        >>> trainer.train()
    """

    def __init__(
        self, model: CAFTModel, mode: str = "caft", train_heads: bool = False, **kwargs: Any
    ) -> None:
        if not isinstance(model, CAFTModel):
            raise TypeError(
                f"CAFTTrainer needs a CAFTModel (see caft.add_auxiliary_heads), got {type(model).__name__}"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode

        if mode == "heads":
            model.set_trainable(trunk=False, heads=True)
        elif mode == "ntp":
            model.set_trainable(heads=False)
        else:
            model.set_trainable(heads=train_heads)
        if not any(parameter.requires_grad for parameter in model.parameters()):
            raise ValueError(
                f"no trainable parameters in mode {mode!r}: apply LoRA, unfreeze the model for full "
                "fine-tuning, or set train_heads=True"
            )

        super().__init__(model=model, **kwargs)
        # CAFTModel.forward takes **kwargs, which makes Trainer believe the model normalises the
        # loss over gradient-accumulation steps itself. It does not: each head's loss is a mean
        # over its own targets in the micro-batch, so Trainer must divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._head_metrics = {"train": HeadMetrics(), "eval": HeadMetrics()}

    # ---------------------------------------------------------------------------------------
    # Loss and metrics

    def training_progress(self) -> float:
        """t / T for the schedule s(t): optimizer steps done over total optimizer steps."""
        max_steps = self.state.max_steps or 0
        return self.state.global_step / max_steps if max_steps > 0 else 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            labels=inputs["labels"],
            mode=self.mode,
            progress=self.training_progress(),
            return_logits=False,  # the loss needs no (B, T, V) logits, and neither does evaluation
        )
        split = "train" if model.training else "eval"
        self._head_metrics[split].add(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Only the loss and the per-head metrics are evaluated: gathering (B, T, V) logits across
        # an evaluation set would cost the memory the chunked loss saves.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        reduce = None
        if self.accelerator.num_processes > 1:
            reduce = lambda tensor: self.accelerator.reduce(
                tensor.to(self.accelerator.device), reduction="sum"
            )
        if any(key.startswith("eval_") for key in logs):
            logs.update(self._head_metrics["eval"].pop(reduce, prefix="eval_"))
        elif "loss" in logs:
            logs.update(self._head_metrics["train"].pop(reduce))
            if self.mode == "caft":
                weights = self.model.caft_config.head_weights(self.training_progress())
                logs["heads_weight"] = round(sum(weights), 8)
        super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------
    # Checkpoints: base model (or adapter) and heads, each in its usual format

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        caft_model = self.accelerator.unwrap_model(self.model)
        # In "heads" mode the base model is frozen, so its weights never change and a checkpoint
        # needs only the heads (an 8B base would otherwise cost 16 GB per checkpoint). Otherwise a
        # PeftModel saves only its adapter and a plain model its full weights.
        if self.mode != "heads":
            caft_model.model.save_pretrained(output_dir)
        save_heads(caft_model, Path(output_dir) / HEADS_SUBFOLDER)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        caft_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        checkpoint = Path(resume_from_checkpoint)
        if not (checkpoint / HEADS_SUBFOLDER).is_dir():
            raise ValueError(
                f"{checkpoint} is not a CAFT checkpoint: it has no {HEADS_SUBFOLDER}/ folder "
                "(checkpoints written by CAFTTrainer have one)"
            )
        if self.mode != "heads":
            load_base_checkpoint(caft_model, checkpoint)
        # Same run, same base: the identity check of load_heads has nothing to add here.
        load_heads(caft_model, checkpoint / HEADS_SUBFOLDER, allow_other_base=True)
        logger.info(
            "Restored %s from %s", "heads" if self.mode == "heads" else "base model and heads", checkpoint
        )

    def _load_best_model(self) -> None:
        logger.info("Loading best model from %s", self.state.best_model_checkpoint)
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def load_base_checkpoint(caft_model: CAFTModel, checkpoint: Path) -> None:
    """Load the base model's weights (or LoRA adapter) saved by `CAFTTrainer._save`."""
    if hasattr(caft_model.model, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter_file = checkpoint / "adapter_model.safetensors"
        if not adapter_file.is_file():
            raise ValueError(f"{checkpoint} has no adapter_model.safetensors to resume the LoRA adapter from")
        result = set_peft_model_state_dict(caft_model.model, load_file(str(adapter_file)))
        if result.unexpected_keys:
            raise ValueError(f"{adapter_file} has unexpected keys {result.unexpected_keys[:5]}")
        return

    single = checkpoint / "model.safetensors"
    index = checkpoint / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [checkpoint / name for name in shard_names]
    else:
        raise ValueError(f"{checkpoint} has neither model.safetensors nor model.safetensors.index.json")

    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = caft_model.model.load_state_dict(state, strict=False)
    # Tied weights (for example a tied lm_head) are saved once, so their second name is
    # reported missing although it shares storage with a loaded tensor.
    tensors = caft_model.model.state_dict()
    loaded = {tensors[key].data_ptr() for key in state if key in tensors}
    missing = [key for key in result.missing_keys if tensors[key].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the weights in {checkpoint} do not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
