"""Concept-aware fine-tuning (CAFT): multi-token prediction heads for fine-tuning causal LMs.

Public API:
    CAFTConfig            settings of the heads and of the multi-token loss
    add_auxiliary_heads   wrap any causal LM in a CAFTModel with auxiliary heads
    CAFTModel, CAFTOutput the wrapper and its forward output
    save_heads, load_heads  the heads file format
    CAFTTrainer           a transformers.Trainer with modes "caft", "ntp" and "heads"
"""

from importlib import import_module

__version__ = "0.1.0"

# Names are imported on first use, so `caft --help` does not pay for importing torch.
_EXPORTS = {
    "CAFTConfig": "config",
    "CAFTModel": "model",
    "CAFTOutput": "model",
    "add_auxiliary_heads": "model",
    "save_heads": "heads_io",
    "load_heads": "heads_io",
    "HeadsMismatchError": "heads_io",
    "CAFTTrainer": "trainer",
    "apply_lora": "lora",
    "DataError": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'caft' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
