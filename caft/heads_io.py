"""Save and load auxiliary heads, apart from the model they were trained on.

Heads are trained once per base model and reused for every fine-tuning run of that model, so they
travel as a small folder of their own:

    heads/
      heads.safetensors   head weights (keys like "0.layers.0.self_attn.q_proj.weight")
      heads_config.json   {"format_version", "caft_version", "caft_config", "base_model": {...}}

`base_model` records the base model's name, architecture, hidden size, vocabulary size and layer
count. Loading rejects heads whose base differs, and the error names both models.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from .architecture import text_config, unwrap_model
from .config import CAFTConfig
from .model import CAFTModel, add_auxiliary_heads

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "heads.safetensors"
CONFIG_NAME = "heads_config.json"
FORMAT_VERSION = 1

# Fields of `base_model` that must match exactly for heads to fit a model.
SHAPE_FIELDS = ("architecture", "hidden_size", "vocab_size", "num_hidden_layers")


class HeadsMismatchError(ValueError):
    """The heads were made for another base model."""


def describe_base_model(model: nn.Module) -> dict[str, Any]:
    """Describe a base model's identity (name, architecture, shapes) as recorded beside its heads."""
    base = unwrap_model(model)
    config = text_config(base)
    architectures = getattr(base.config, "architectures", None) or [type(base).__name__]
    return {
        "name_or_path": getattr(base.config, "_name_or_path", "") or getattr(base, "name_or_path", ""),
        "architecture": architectures[0],
        "model_type": getattr(base.config, "model_type", None),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "num_hidden_layers": config.num_hidden_layers,
    }


def default_file_mode() -> int:
    """Return the mode a newly created file gets under the current umask (0o644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomically(path: Path, write) -> None:
    """Call `write(temporary_path)`, then rename onto `path`, so no half-written file is left."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates owner-only files; give the final file the usual permissions.
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_heads(caft_model: CAFTModel, directory: str | os.PathLike) -> Path:
    """Write `caft_model`'s heads and their metadata to `directory` (created if missing)."""
    if not isinstance(caft_model, CAFTModel):
        raise TypeError(f"save_heads expects a CAFTModel, got {type(caft_model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    state = {
        name: tensor.detach().contiguous().cpu() for name, tensor in caft_model.heads.state_dict().items()
    }
    metadata = {
        "format_version": FORMAT_VERSION,
        "caft_version": _caft_version(),
        "caft_config": caft_model.caft_config.to_dict(),
        "base_model": describe_base_model(caft_model.model),
    }
    _write_atomically(
        directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata={"format": "pt"})
    )
    _write_atomically(
        directory / CONFIG_NAME, lambda path: Path(path).write_text(json.dumps(metadata, indent=2) + "\n")
    )
    logger.info("Saved %d head(s) to %s", len(caft_model.heads), directory)
    return directory


def read_heads_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read `heads_config.json` from a heads folder (a local path or a Hugging Face Hub id)."""
    directory = resolve_heads_path(path)
    config_path = directory / CONFIG_NAME
    try:
        metadata = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: invalid JSON: {error}") from error
    for key in ("caft_config", "base_model"):
        if key not in metadata:
            raise ValueError(f"{config_path}: missing key {key!r}; is this a heads folder written by caft?")
    return metadata


def resolve_heads_path(path: str | os.PathLike) -> Path:
    """Return a local heads folder, downloading `path` from the Hub when it is not a local path."""
    local = Path(path)
    if local.is_dir():
        if not (local / CONFIG_NAME).is_file() or not (local / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{local} is not a heads folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(written by caft.save_heads or `caft train-heads`)"
            )
        return local
    if local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"heads folder not found: {path}")

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as error:  # the Hub client raises many types; all mean "not available"
        raise FileNotFoundError(
            f"heads not found: {path} is neither a local folder nor a reachable Hub repository ({error})"
        ) from error


def check_heads_match(
    metadata: dict[str, Any], model: nn.Module, source: str, allow_other_base: bool
) -> None:
    """Raise `HeadsMismatchError` when heads described by `metadata` do not fit `model`."""
    saved = metadata["base_model"]
    current = describe_base_model(model)
    saved_name = saved.get("name_or_path") or "an unnamed model"
    current_name = current.get("name_or_path") or "an unnamed model"

    differences = [
        f"{field}: heads {saved.get(field)!r}, model {current.get(field)!r}"
        for field in SHAPE_FIELDS
        if saved.get(field) != current.get(field)
    ]
    if differences:
        raise HeadsMismatchError(
            f"heads at {source} were made for {saved_name} and do not fit {current_name}: "
            + "; ".join(differences)
        )

    # Same shapes but another model (for example a base and its instruct variant): the weights would
    # load, but the heads would predict another model's hidden states.
    if Path(saved_name).name != Path(current_name).name and not allow_other_base:
        raise HeadsMismatchError(
            f"heads at {source} were made for {saved_name}, not for {current_name}. If both names "
            "refer to the same weights, pass allow_other_base=True (CLI: --heads-allow-other-base)"
        )


def load_heads(
    model_or_caft_model: nn.Module, path: str | os.PathLike, allow_other_base: bool = False
) -> CAFTModel:
    """Load heads from `path` onto a causal LM or a `CAFTModel` and return the `CAFTModel`.

    A plain causal LM gets new heads built from the saved `CAFTConfig`. A `CAFTModel` whose heads
    have the same structure (`STRUCTURE_FIELDS`) gets its weights replaced in place and keeps its
    own loss settings. Otherwise the heads are rebuilt, which requires that no LoRA was applied yet
    (the rebuilt heads copy the last decoder layer).

    Raises:
        HeadsMismatchError: the heads were saved for another base model.
        FileNotFoundError: `path` is not a heads folder.
    """
    directory = resolve_heads_path(path)
    metadata = read_heads_metadata(directory)
    config = CAFTConfig.from_dict(metadata["caft_config"], source=str(directory / CONFIG_NAME))

    if isinstance(model_or_caft_model, CAFTModel):
        caft_model = model_or_caft_model
        check_heads_match(metadata, caft_model.model, str(directory), allow_other_base)
        if caft_model.caft_config.same_structure(config):
            # Same parameters: load in place and keep the model's own loss settings.
            config = caft_model.caft_config
        else:
            if hasattr(caft_model.model, "peft_config"):
                raise ValueError(
                    f"heads at {directory} have another CAFTConfig than the model's heads; load "
                    "them before applying LoRA"
                )
            caft_model = add_auxiliary_heads(caft_model.model, config)
    else:
        check_heads_match(metadata, model_or_caft_model, str(directory), allow_other_base)
        caft_model = add_auxiliary_heads(model_or_caft_model, config)

    state = load_file(str(directory / WEIGHTS_NAME))
    missing, unexpected = caft_model.heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not match the heads of {config.head_type!r} type: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    logger.info("Loaded %d head(s) from %s", len(caft_model.heads), directory)
    return caft_model


def _caft_version() -> str:
    from . import __version__

    return __version__
