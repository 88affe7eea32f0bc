"""Auxiliary prediction heads: head k maps a trunk state at position t to a guess of token t+k.

Two kinds, both followed by the base model's final norm and unembedding:
- `TransformerHead`: `layers_per_head` copies of the model's own last decoder layer. It reads the
  hidden state that enters the last decoder layer and runs beside that layer, called with the
  same mask and rotary embeddings the model built for it.
- `ResBlockHead`: `layers_per_head` blocks of x + SiLU(W x + b), reading the last decoder layer's
  output (before the final norm). W and b start at zero, so every head starts out predicting what
  the next-token head predicts.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .architecture import LayerCall
from .config import CAFTConfig

logger = logging.getLogger(__name__)


class ResBlock(nn.Module):
    """x + SiLU(W x + b), with W and b initialised to zero so the block starts as the identity."""

    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, dtype=dtype, device=device)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.act(self.linear(hidden))


class TransformerHead(nn.Module):
    """A stack of decoder layers of the base model's own class."""

    reads = "input"  # reads the hidden state entering the last decoder layer

    def __init__(self, layers: list[nn.Module], unembedding: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.unembedding = unembedding

    def forward(self, call: LayerCall) -> torch.Tensor:
        hidden = call.hidden_states  # (B, T, H)
        for layer in self.layers:
            output = layer(**{call.hidden_argument: hidden}, **call.kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        return hidden


class ResBlockHead(nn.Module):
    """A stack of zero-initialised residual blocks."""

    reads = "output"  # reads the last decoder layer's output, before the final norm

    def __init__(self, blocks: list[ResBlock], unembedding: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.unembedding = unembedding

    def forward(self, call: LayerCall) -> torch.Tensor:
        hidden = call.output  # (B, T, H)
        for block in self.layers:
            hidden = block(hidden)
        return hidden


def _reinitialize(model: nn.Module, module: nn.Module) -> None:
    """Re-draw `module`'s weights with the base model's own initialisation scheme."""
    init_weights = getattr(model, "_init_weights", None)
    if not callable(init_weights):
        raise ValueError(
            f"head_init='random' needs {type(model).__name__}._init_weights; use 'copy_last_layer'"
        )
    for submodule in module.modules():
        init_weights(submodule)


def build_heads(
    model: nn.Module, last_layer: nn.Module, hidden_size: int, config: CAFTConfig
) -> nn.ModuleList:
    """Create `config.num_aux_heads` heads for `model`, on its device and in its dtype."""
    reference = next(last_layer.parameters())
    heads = []
    for _ in range(config.num_aux_heads):
        unembedding = None
        if config.separate_unembedding:
            # A real copy, never tied: each head learns its own unembedding.
            unembedding = copy.deepcopy(model.get_output_embeddings())

        if config.head_type == "transformer":
            layers = []
            for _ in range(config.layers_per_head):
                layer = copy.deepcopy(last_layer)
                if config.head_init == "random":
                    _reinitialize(model, layer)
                layers.append(layer)
            head: nn.Module = TransformerHead(layers, unembedding)
        else:
            blocks = [
                ResBlock(hidden_size, dtype=reference.dtype, device=reference.device)
                for _ in range(config.layers_per_head)
            ]
            head = ResBlockHead(blocks, unembedding)
        heads.append(head)

    heads_module = nn.ModuleList(heads)
    for parameter in heads_module.parameters():
        parameter.requires_grad_(True)
    return heads_module


def head_parameter_count(heads: nn.Module) -> int:
    return sum(parameter.numel() for parameter in heads.parameters())


def describe_heads(heads: nn.ModuleList, config: CAFTConfig) -> dict[str, Any]:
    return {
        "num_aux_heads": len(heads),
        "head_type": config.head_type,
        "parameters": head_parameter_count(heads),
    }
