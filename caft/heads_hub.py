"""Share heads folders: describe them (`caft heads info`) and upload them (`caft heads push`).

Heads are trained once per base model, so a team or the public can reuse them. A pushed
repository contains the two files of the heads format plus a generated model card (README.md) that
names the base model and the settings; `caft finetune --heads OWNER/NAME` downloads it again.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .heads_io import CONFIG_NAME, WEIGHTS_NAME, read_heads_metadata, resolve_heads_path

logger = logging.getLogger(__name__)


def heads_info(path: str | Path) -> dict[str, Any]:
    """Collect a heads folder's metadata, its size, and the accuracy figures saved beside it.

    `train-heads` writes `metrics.json` in the folder above `heads/`; when present, its
    per-head top-1 accuracies before and after training are included.
    """
    directory = resolve_heads_path(path)
    metadata = read_heads_metadata(directory)
    info: dict[str, Any] = {
        "path": str(directory),
        "weights_bytes": (directory / WEIGHTS_NAME).stat().st_size,
        **metadata,
    }
    metrics_path = directory.parent / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError:
            metrics = {}
        for key in ("initial", "final"):
            if key in metrics:
                info.setdefault("accuracy", {})[key] = metrics[key]
    return info


def format_heads_info(info: dict[str, Any]) -> str:
    """Render `heads_info` as aligned text lines."""
    base = info["base_model"]
    config = info["caft_config"]
    lines = [
        f"heads folder:   {info['path']}",
        f"base model:     {base.get('name_or_path') or '(unnamed)'} ({base.get('architecture')})",
        f"base shapes:    hidden size {base.get('hidden_size')}, vocabulary {base.get('vocab_size')}, "
        f"{base.get('num_hidden_layers')} layers",
        f"heads:          {config['num_aux_heads']} x {config['head_type']} "
        f"({config['layers_per_head']} layer(s) each, init {config['head_init']}, "
        f"{'own' if config['separate_unembedding'] else 'shared'} unembedding), predicting "
        f"t+2 .. t+{config['num_aux_heads'] + 1}",
        f"loss settings:  beta {config['heads_coefficient']}, gamma {config['decay']}, "
        f"schedule {config['schedule']}, chunk {config['loss_chunk_size']} tokens",
        f"weights:        {info['weights_bytes'] / 1e6:.2f} MB ({WEIGHTS_NAME})",
        f"written by:     caft {info.get('caft_version', '?')}, format {info.get('format_version', '?')}",
    ]
    for key, values in info.get("accuracy", {}).items():
        top1 = values.get("top1") if isinstance(values, dict) else None
        if top1:
            formatted = ", ".join(f"t+{index + 2}: {value:.4f}" for index, value in enumerate(top1))
            lines.append(f"top-1 ({key}):  {formatted}")
    return "\n".join(lines)


def model_card(info: dict[str, Any], repo_id: str) -> str:
    """Write a short README for a pushed heads repository."""
    base = info["base_model"]
    config = info["caft_config"]
    name = base.get("name_or_path") or "an unnamed model"
    return f"""---
library_name: caft
tags:
- caft
- multi-token-prediction
---

# Auxiliary heads for {name}

{config["num_aux_heads"]} {config["head_type"]} heads for concept-aware fine-tuning (CAFT) of
`{name}` ({base.get("architecture")}, hidden size {base.get("hidden_size")}, vocabulary
{base.get("vocab_size")}). Head k predicts token t+k for k = 2 .. {config["num_aux_heads"] + 1}.

Use them in fine-tuning with:

```bash
caft finetune --model {name} --heads {repo_id} --data train.jsonl
```

or in Python with `caft.load_heads(model, "{repo_id}")`. The settings are in `{CONFIG_NAME}`.
"""


def push_heads(
    path: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api=None,
) -> str:
    """Upload a heads folder with a model card to the Hub repository `repo_id`; returns its URL.

    `api` defaults to `huggingface_hub.HfApi(token=token)`; tests pass a stand-in.
    """
    info = heads_info(path)  # validates the folder before anything is uploaded
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise ValueError(f"invalid repository id {repo_id!r}: expected OWNER/NAME")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)

    staging = Path(tempfile.mkdtemp(prefix="caft-heads-push-"))
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copy2(Path(info["path"]) / name, staging / name)
        (staging / "README.md").write_text(model_card(info, repo_id))
        repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(staging),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message
            or f"Upload CAFT heads for {info['base_model'].get('name_or_path')}",
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Pushed heads from %s to %s", info["path"], repo_id)
    return str(repo_url)
