"""Find the parts of a causal LM that the auxiliary heads share, whatever its architecture.

A CAFT head needs four things from the base model:
- the last decoder layer, to copy it and to capture its input;
- the exact keyword arguments the model passes to that layer (causal or sliding-window mask,
  rotary position embeddings, position ids), so a copy of the layer runs exactly as the original;
- the final norm (plus OPT's `project_out`, when present);
- the unembedding and any logit post-processing (Gemma 2's `final_logit_softcapping`).

Instead of rebuilding masks and rotary embeddings for each architecture, a forward pre-hook on the
last decoder layer records the call the model itself makes. That works for any model whose decoder
layers are called as modules, and it sees sliding-window masks, eager attention and partial rotary
embeddings exactly as the model built them. Hooks are registered for one forward and removed right
after, so gradient-checkpoint recomputation and generation never see them.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Attribute names of the final norm across transformers architectures (Llama family: `norm`;
# OPT, GPT-NeoX: `final_layer_norm`; GPT-2: `ln_f`; Phi-1/2: `final_layernorm`).
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f", "final_norm")

# Parameters through which a decoder layer reads or writes a KV cache. A head must never touch the
# base model's cache: a deep-copied layer keeps the original's `layer_idx` and would overwrite its slot.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


class UnsupportedModelError(ValueError):
    """The model's decoder layers, final norm or unembedding could not be located."""


@dataclass
class ModelParts:
    """Dotted module paths (relative to the unwrapped causal LM) of the parts heads share."""

    layers_path: str
    final_norm_path: str | None
    project_out_path: str | None
    logit_softcap: float | None
    num_layers: int


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a PEFT wrapper (or `model` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        return get_base_model()
    return model


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def locate_parts(model: nn.Module) -> ModelParts:
    """Find the decoder layers, final norm, `project_out` and logit soft-cap of a causal LM.

    The decoder layers are the `nn.ModuleList` whose length equals `num_hidden_layers`. The final
    norm is a direct child of the module that owns those layers, under one of `FINAL_NORM_NAMES`.
    """
    model = unwrap_model(model)
    config = text_config(model)
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the config has no num_hidden_layers, so the decoder layers "
            "cannot be located"
        )

    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name
    ]
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no nn.ModuleList of {num_layers} decoder layers"
        )
    # The shortest path is the trunk's own list (deeper lists of the same length are inside layers).
    layers_path = min(candidates, key=lambda name: name.count("."))
    owner_path = layers_path.rpartition(".")[0]
    owner = model.get_submodule(owner_path) if owner_path else model

    final_norm_path = None
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(owner, name, None), nn.Module):
            final_norm_path = f"{owner_path}.{name}" if owner_path else name
            break
    if final_norm_path is None:
        logger.warning(
            "%s: no final norm found among %s; heads feed the unembedding directly",
            type(model).__name__,
            FINAL_NORM_NAMES,
        )

    project_out_path = None
    if isinstance(getattr(owner, "project_out", None), nn.Module):
        project_out_path = f"{owner_path}.project_out" if owner_path else "project_out"

    if model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embeddings (unembedding)")

    softcap = getattr(config, "final_logit_softcapping", None)
    return ModelParts(
        layers_path=layers_path,
        final_norm_path=final_norm_path,
        project_out_path=project_out_path,
        logit_softcap=float(softcap) if softcap else None,
        num_layers=num_layers,
    )


def last_decoder_layer(model: nn.Module, parts: ModelParts) -> nn.Module:
    return unwrap_model(model).get_submodule(parts.layers_path)[-1]


def apply_final_norm(model: nn.Module, parts: ModelParts, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the final norm and OPT's `project_out` when present: (..., H) -> (..., H')."""
    model = unwrap_model(model)
    if parts.final_norm_path is not None:
        hidden = model.get_submodule(parts.final_norm_path)(hidden)
    if parts.project_out_path is not None:
        hidden = model.get_submodule(parts.project_out_path)(hidden)
    return hidden


def apply_unembedding(
    model: nn.Module, parts: ModelParts, normalized: torch.Tensor, unembedding: nn.Module | None = None
) -> torch.Tensor:
    """Apply the unembedding (the model's own unless given) and Gemma 2's soft-cap: (..., H') -> (..., V).

    The model's unembedding is looked up on every call, because PEFT may wrap it after the heads
    were attached.
    """
    if unembedding is None:
        unembedding = unwrap_model(model).get_output_embeddings()
    logits = unembedding(normalized)
    if parts.logit_softcap is not None:
        logits = torch.tanh(logits / parts.logit_softcap) * parts.logit_softcap
    return logits


# --------------------------------------------------------------------------------------------
# Capturing the last decoder layer's call


@dataclass
class LayerCall:
    """The last decoder layer's input, its keyword arguments and its output, from one forward."""

    hidden_states: torch.Tensor  # (B, T, H) input of the last layer
    kwargs: dict[str, Any]  # every other argument, by name, with cache arguments removed
    hidden_argument: str  # the parameter name under which the layer takes its input
    output: torch.Tensor | None = None  # (B, T, H) output of the last layer, before the final norm


def _bind_call(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[str, torch.Tensor, dict]:
    """Turn a layer call into (input name, input tensor, keyword arguments).

    Some layers take positional arguments in model-specific order (GPT-2 passes the cache second),
    so the call is bound to the layer's signature and replayed by keyword only.
    """
    signature = inspect.signature(layer.forward)
    bound = signature.bind(*args, **kwargs)
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise UnsupportedModelError(
                f"{type(layer).__name__} was called with extra positional arguments; "
                "CAFT heads can only replay keyword arguments"
            )
        else:
            arguments[name] = value

    hidden_name = next(iter(signature.parameters))
    hidden = arguments.pop(hidden_name)
    for name in CACHE_ARGUMENTS:
        if name in arguments:
            arguments[name] = None
    if "use_cache" in arguments:
        arguments["use_cache"] = False
    return hidden_name, hidden, arguments


@contextmanager
def capture_layer_call(layer: nn.Module, keep_output: bool) -> Iterator[list[LayerCall]]:
    """Record the next call of `layer` while the context is open.

    Yields a list that contains one `LayerCall` after the model's forward. If the layer runs more
    than once (it should not), the last call wins.
    """
    calls: list[LayerCall] = []

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        name, hidden, arguments = _bind_call(module, args, kwargs)
        calls.clear()
        calls.append(LayerCall(hidden_states=hidden, kwargs=arguments, hidden_argument=name))

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if keep_output and calls:
            calls[-1].output = output[0] if isinstance(output, tuple) else output

    handles = [
        layer.register_forward_pre_hook(before, with_kwargs=True),
        layer.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
