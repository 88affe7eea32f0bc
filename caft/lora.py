"""LoRA and full fine-tuning set-up for a `CAFTModel`.

LoRA goes into the base model only: PEFT wraps `caft_model.model`, and the heads, which live
beside it, never receive adapters. (Given as a name list, PEFT's `target_modules` matches by
suffix, so wrapping the whole `CAFTModel` would also put LoRA into head layers that reuse the
base model's projection names.)
"""

from __future__ import annotations

import logging

from .architecture import unwrap_model
from .model import CAFTModel

logger = logging.getLogger(__name__)


def apply_lora(
    caft_model: CAFTModel,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str | list[str] = "all-linear",
) -> CAFTModel:
    """Wrap `caft_model.model` in a PEFT LoRA model; returns the same `CAFTModel`.

    `target_modules="all-linear"` targets every linear layer of the base model except the
    unembedding (PEFT's own rule). The base weights are frozen; the heads keep their own
    `requires_grad` and are set by `CAFTTrainer`.
    """
    from peft import LoraConfig, get_peft_model

    if hasattr(caft_model.model, "peft_config"):
        raise ValueError("LoRA is already applied to this model")
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    caft_model.model = get_peft_model(caft_model.model, config)
    adapter = sum(p.numel() for name, p in caft_model.model.named_parameters() if "lora_" in name)
    base = sum(p.numel() for name, p in caft_model.model.named_parameters() if "lora_" not in name)
    logger.info(
        "LoRA r=%d on %s: %d adapter parameters on a %d-parameter model", r, target_modules, adapter, base
    )
    return caft_model


def prepare_full_finetuning(caft_model: CAFTModel, freeze_unembedding: bool = False) -> CAFTModel:
    """Make every base parameter trainable, optionally except the unembedding."""
    caft_model.set_trainable(trunk=True)
    if freeze_unembedding:
        base = unwrap_model(caft_model.model)
        unembedding = base.get_output_embeddings()
        for parameter in unembedding.parameters():
            parameter.requires_grad_(False)
        input_embedding = base.get_input_embeddings()
        if input_embedding is not None and input_embedding.weight is unembedding.weight:
            logger.warning("The unembedding is tied to the input embedding: freezing it freezes both")
    return caft_model
