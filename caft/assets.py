"""Locate the shared assets folder (real models and datasets) named by `CAFT_ASSETS`.

Configs refer to it as `${CAFT_ASSETS}`, for example `${CAFT_ASSETS}/models/stories260k`.
When the variable is unset, `../shared` is tried relative to the current directory, then relative
to this source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VARIABLE = "CAFT_ASSETS"
DEFAULT_RELATIVE = Path("..") / "shared"


def assets_dir() -> Path:
    """Return the assets folder: `$CAFT_ASSETS`, else the first `../shared` that exists.

    The returned path may not exist (when nothing was found); callers that need a file report
    the missing path.
    """
    configured = os.environ.get(ENV_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    candidates = [Path.cwd() / DEFAULT_RELATIVE, Path(__file__).resolve().parents[1] / DEFAULT_RELATIVE]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0]


def expand_path_variables(value: str) -> str:
    """Expand `${CAFT_ASSETS}` (with its default) and other environment variables in `value`."""
    value = value.replace("${" + ENV_VARIABLE + "}", str(assets_dir()))
    value = value.replace("$" + ENV_VARIABLE, str(assets_dir()))
    return os.path.expandvars(os.path.expanduser(value))
