"""`CAFTModel`: a causal LM plus auxiliary heads, and the multi-token loss over them.

The base model is called unmodified, so its next-token logits are exactly the base model's. While
it runs, a hook records the last decoder layer's call (see `architecture.py`). The heads then
replay that call on their own layers and go through the shared final norm and unembedding. Their
losses are computed in chunks (see `loss.py`).

Example:
    >>> model = AutoModelForCausalLM.from_pretrained("path/to/model")
    >>> caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=4))
    >>> out = caft_model(input_ids, attention_mask=attention_mask, labels=labels)
    >>> out.loss.backward()
    >>> out.head_losses  # (5,) next-token loss first, then heads predicting t+2 .. t+5
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .architecture import (
    LayerCall,
    ModelParts,
    apply_final_norm,
    apply_unembedding,
    capture_layer_call,
    last_decoder_layer,
    locate_parts,
    text_config,
    unwrap_model,
)
from .config import CAFTConfig
from .heads import build_heads
from .loss import IGNORE_INDEX, CrossEntropyResult, chunked_cross_entropy, count_correct, shift_targets

logger = logging.getLogger(__name__)

MODES = ("caft", "ntp", "heads")


@dataclass
class CAFTOutput(ModelOutput):
    """Output of `CAFTModel.forward`.

    Index 0 of the per-head fields is the next-token head; index k is the head predicting
    token t+1+k. Heads that did not run in the chosen mode hold NaN.
    """

    loss: torch.Tensor | None = None  # weighted total that the mode trains on
    logits: torch.Tensor | None = None  # (B, T, V) next-token logits; (B, 1, V) with return_logits=False
    head_losses: torch.Tensor | None = None  # (n,) unweighted mean cross-entropy per head
    head_accuracies: torch.Tensor | None = None  # (n,) top-1 accuracy per head
    head_top5_accuracies: torch.Tensor | None = None  # (n,) top-5 accuracy per head
    head_num_targets: torch.Tensor | None = None  # (n,) valid targets per head
    head_logits: list[torch.Tensor] | None = None  # n tensors (B, T, V), only on request


class CAFTModel(nn.Module):
    """A causal LM with auxiliary heads; see `add_auxiliary_heads`.

    Attributes:
        model: the wrapped causal LM (a `PreTrainedModel`, or a `PeftModel` after `apply_lora`).
        heads: `nn.ModuleList` of auxiliary heads, head index 0 predicting token t+2.
        caft_config: the `CAFTConfig` the heads were built with.
    """

    def __init__(self, model: nn.Module, heads: nn.ModuleList, config: CAFTConfig, parts: ModelParts):
        super().__init__()
        self.model = model
        self.heads = heads
        self.caft_config = config
        self.parts = parts
        self._forward_parameters = set(inspect.signature(unwrap_model(model).forward).parameters)

    # ---------------------------------------------------------------------------------------
    # Conveniences the Hugging Face Trainer and users expect of a model

    @property
    def config(self):
        return unwrap_model(self.model).config

    @property
    def base_model(self) -> nn.Module:
        """The unwrapped transformers model (inside any PEFT wrapper)."""
        return unwrap_model(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """Recompute the base model's layer activations in backward (transformers' own mechanism)."""
        self.base_model.activation_checkpointing_enable(**kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.base_model.activation_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        self.base_model.enable_input_require_grads()

    # ---------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        mode: str = "caft",
        progress: float = 0.0,
        return_head_logits: bool = False,
        return_logits: bool = True,
        **kwargs: Any,
    ) -> CAFTOutput:
        """Run the base model and, unless `mode` is "ntp", the auxiliary heads.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens. Positions with 0 never get a target.
            labels: (B, T) token ids aligned with `input_ids` (not shifted), -100 where no loss.
            mode: "caft": loss = CE_1 + beta s(progress) sum_k gamma^(k-1) CE_k;
                "ntp": next-token loss only, heads skipped (the fair baseline, same code path);
                "heads": loss = sum_k gamma^(k-1) CE_k over auxiliary heads, next-token loss
                reported without gradient.
            progress: training progress t / T in [0, 1], for the schedule s.
            return_head_logits: also return each auxiliary head's full (B, T, V) logits. For
                tests and debugging only: this is the memory cost the chunked loss avoids.
            return_logits: return the base model's full (B, T, V) next-token logits. With False
                (what `CAFTTrainer` passes) in "caft" mode, the next-token loss is computed in
                chunks from the last layer's output like the heads' losses, and `.logits` contains
                only the last position, (B, 1, V). The loss is the same up to float rounding.
            kwargs: passed to the base model (for example `position_ids`).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        run_heads = mode != "ntp" or return_head_logits
        num_heads = len(self.heads) + 1

        kwargs["use_cache"] = False
        can_skip_logits = labels is not None and "logits_to_keep" in self._forward_parameters
        # In "heads" mode, and in "caft" mode when the caller needs no logits, the next-token loss
        # is taken from the last layer's output below, in chunks, so the base model need not build
        # its (B, T, V) logits. Full fine-tuning at a 128k vocabulary saves several (B, T, V) fp32
        # buffers this way: the logits, their fp32 upcast and its gradient.
        chunked_next_token = can_skip_logits and (mode == "heads" or (mode == "caft" and not return_logits))
        if chunked_next_token:
            kwargs.setdefault("logits_to_keep", 1)

        calls: list[LayerCall] = []
        layer = last_decoder_layer(self.model, self.parts)
        needs_output = chunked_next_token or mode == "heads" or self.caft_config.head_type == "resblock"
        if run_heads:
            # In "heads" mode the trunk is frozen: running it without a graph saves its activations.
            grad_context = torch.no_grad() if mode == "heads" else contextlib.nullcontext()
            with capture_layer_call(layer, keep_output=needs_output) as calls, grad_context:
                base_output = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if not calls:
                raise RuntimeError(
                    f"the last decoder layer ({type(layer).__name__}) did not run during the forward "
                    "pass (layer drop?), so the auxiliary heads have no input"
                )
        else:
            base_output = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = base_output.logits

        head_logits: list[torch.Tensor] | None = [] if return_head_logits else None
        nan = torch.tensor(float("nan"), device=logits.device)
        losses = [nan] * num_heads
        accuracies = [nan] * num_heads
        top5_accuracies = [nan] * num_heads
        counts = [torch.zeros((), dtype=torch.long, device=logits.device)] * num_heads

        if labels is not None:
            if mode == "heads":
                with torch.no_grad():
                    result = self._head_cross_entropy(calls[0].output, labels, attention_mask, offset=1)
            elif chunked_next_token:
                result = self._head_cross_entropy(calls[0].output, labels, attention_mask, offset=1)
            else:
                result = _next_token_cross_entropy(logits, labels, attention_mask)
            losses[0], accuracies[0], counts[0] = result.mean_loss(), result.accuracy(), result.num_targets
            top5_accuracies[0] = result.top5_accuracy()

        aux_results: list[CrossEntropyResult] = []
        if run_heads:
            call = calls[0]
            for index, head in enumerate(self.heads):
                hidden = head(call)  # (B, T, H)
                if head_logits is not None:
                    head_logits.append(self._project(hidden, head))
                if labels is not None:
                    result = self._head_cross_entropy(
                        hidden, labels, attention_mask, offset=index + 2, head=head
                    )
                    aux_results.append(result)
                    losses[index + 1] = result.mean_loss()
                    accuracies[index + 1] = result.accuracy().detach()
                    top5_accuracies[index + 1] = result.top5_accuracy()
                    counts[index + 1] = result.num_targets

        loss = None
        if labels is not None:
            loss = self._total_loss(mode, losses, aux_results, progress)

        return CAFTOutput(
            loss=loss,
            logits=logits,
            head_losses=torch.stack([value.float() for value in losses]) if labels is not None else None,
            head_accuracies=torch.stack(accuracies).detach() if labels is not None else None,
            head_top5_accuracies=torch.stack(top5_accuracies).detach() if labels is not None else None,
            head_num_targets=torch.stack(counts) if labels is not None else None,
            head_logits=head_logits,
        )

    def _total_loss(
        self, mode: str, losses: list[torch.Tensor], aux_results: list[CrossEntropyResult], progress: float
    ) -> torch.Tensor:
        if mode == "ntp":
            return losses[0]
        if mode == "heads":
            weights = [self.caft_config.decay ** (k - 1) for k in range(2, len(self.heads) + 2)]
            return sum(weight * result.mean_loss() for weight, result in zip(weights, aux_results))
        weights = self.caft_config.head_weights(progress)
        return losses[0] + sum(weight * result.mean_loss() for weight, result in zip(weights, aux_results))

    def _project(self, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """Final norm, unembedding and soft-cap: (B, T, H) -> (B, T, V)."""
        normalized = apply_final_norm(self.model, self.parts, hidden)
        unembedding = getattr(head, "unembedding", None)
        return apply_unembedding(self.model, self.parts, normalized, unembedding)

    def _head_cross_entropy(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None,
        offset: int,
        head: nn.Module | None = None,
    ) -> CrossEntropyResult:
        targets = shift_targets(labels, offset, attention_mask)  # (B, T)
        # The final norm is cheap and (B, T, H)-sized, so it runs once outside the chunks. Only the
        # vocabulary projection, the (B, T, V)-sized step, is chunked and recomputed.
        normalized = apply_final_norm(self.model, self.parts, hidden)
        unembedding = getattr(head, "unembedding", None)

        def project(chunk: torch.Tensor) -> torch.Tensor:
            return apply_unembedding(self.model, self.parts, chunk, unembedding)

        return chunked_cross_entropy(normalized, targets, project, self.caft_config.loss_chunk_size)

    # ---------------------------------------------------------------------------------------
    # Parameter groups

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Parameters of the base model, the unembedding included (shared or tied)."""
        return list(self.model.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def set_trainable(self, trunk: bool | None = None, heads: bool | None = None) -> None:
        """Freeze or unfreeze the base model and the heads; `None` leaves a group as it is.

        With a PEFT model, `trunk=True` unfreezes only the LoRA adapters (PEFT's own choice of
        trainable parameters), never the frozen base weights.
        """
        if trunk is not None:
            if hasattr(self.model, "peft_config"):
                for name, parameter in self.model.named_parameters():
                    parameter.requires_grad_(trunk and "lora_" in name)
            else:
                for parameter in self.model.parameters():
                    parameter.requires_grad_(trunk)
        if heads is not None:
            for parameter in self.heads.parameters():
                parameter.requires_grad_(heads)

    def merge_and_unload(self) -> nn.Module:
        """Merge LoRA into the base weights (when present) and return the plain causal LM, no heads."""
        if hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()
        return self.model


def _next_token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None
) -> CrossEntropyResult:
    """Next-token loss from the base model's own logits, as transformers computes it for right padding.

    Unlike transformers' loss, a padded position never predicts the first real token (which
    matters only with left padding).
    """
    targets = shift_targets(labels, 1, attention_mask)[:, :-1]  # (B, T-1)
    logits = logits[:, :-1].float()  # (B, T-1, V)
    valid = targets != IGNORE_INDEX
    loss_sum = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    # No boolean indexing here: `logits[valid]` would copy the (N, V) fp32 logits. A target of -100
    # never equals a predicted token id, so ignored positions count as misses by themselves.
    num_correct, num_correct_top5 = count_correct(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return CrossEntropyResult(loss_sum, num_correct, valid.sum(), num_correct_top5)


def add_auxiliary_heads(model: nn.Module, config: CAFTConfig | None = None) -> CAFTModel:
    """Attach `config.num_aux_heads` auxiliary heads to a causal LM.

    The model's `forward` and classes are left untouched: the returned `CAFTModel` owns `model`
    and calls it. Heads are created on the model's device and in its dtype, trainable.

    Raises:
        UnsupportedModelError: if the decoder layers or the unembedding cannot be located.
    """
    config = config or CAFTConfig()
    if isinstance(model, CAFTModel):
        raise ValueError("the model already has auxiliary heads (it is a CAFTModel)")
    parts = locate_parts(model)
    last_layer = last_decoder_layer(model, parts)
    hidden_size = text_config(unwrap_model(model)).hidden_size
    heads = build_heads(unwrap_model(model), last_layer, hidden_size, config)
    logger.info(
        "Attached %d %s head(s) to %s (%d parameters)",
        config.num_aux_heads,
        config.head_type,
        type(unwrap_model(model)).__name__,
        sum(p.numel() for p in heads.parameters()),
    )
    return CAFTModel(model, heads, config, parts)
