"""`CAFTConfig`: the settings of the auxiliary heads and of the multi-token loss.

The field help doubles as CLI help: `caft finetune --help` lists these fields with their defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

HEAD_TYPES = ("transformer", "resblock")

# Fields that define the heads' parameters; saved heads fix them. The other fields only shape
# the loss, so each run may choose its own.
STRUCTURE_FIELDS = ("num_aux_heads", "head_type", "layers_per_head", "head_init", "separate_unembedding")
HEAD_INITS = ("copy_last_layer", "random")
SCHEDULES = ("rsine", "sine", "linear", "constant")


@dataclass
class CAFTConfig:
    """Settings of the auxiliary heads and of the CAFT loss.

    The training loss is `CE_1 + heads_coefficient * s(t) * sum_k decay**(k-1) * CE_k`, where
    head k (k = 2 .. num_aux_heads + 1) predicts token t+k, `CE_1` is the model's own next-token
    loss and `s(t)` is the schedule.

    Example:
        >>> config = CAFTConfig(num_aux_heads=2, heads_coefficient=0.05)
        >>> config.head_weights(progress=0.0)
        [0.04000000000000001, 0.032000000000000006]
    """

    num_aux_heads: int = field(
        default=4,
        metadata={
            "help": "Number of auxiliary heads; head k predicts token t+k for k = 2 .. n+1. "
            "0 attaches none (plain next-token training)."
        },
    )
    head_type: str = field(
        default="transformer",
        metadata={
            "help": "'transformer': each head is a copy of the model's last decoder layer; "
            "'resblock': x + SiLU(Wx) with W initialised to zero."
        },
    )
    layers_per_head: int = field(
        default=1,
        metadata={"help": "Decoder layers (or residual blocks) stacked in each head."},
    )
    head_init: str = field(
        default="copy_last_layer",
        metadata={
            "help": "'copy_last_layer': transformer heads start from the last decoder layer's "
            "weights; 'random': the model's own weight initialisation."
        },
    )
    separate_unembedding: bool = field(
        default=False,
        metadata={
            "help": "Give each head its own copy of the unembedding (lm_head) instead of sharing "
            "the model's; costs vocab x hidden parameters per head."
        },
    )
    heads_coefficient: float = field(
        default=0.01,
        metadata={"help": "beta: weight of the auxiliary heads' losses relative to the next-token loss."},
    )
    decay: float = field(
        default=0.8,
        metadata={"help": "gamma: head k's loss is weighted by gamma**(k-1)."},
    )
    schedule: str = field(
        default="rsine",
        metadata={
            "help": "s(t) with progress p = step / total steps: 'rsine' sin(pi/2 (1-p)) (falls from 1 "
            "to 0), 'sine' sin(pi/2 p), 'linear' 1-p, 'constant' 1."
        },
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Tokens per chunk in the auxiliary heads' cross-entropy; extra memory is about "
            "chunk x vocab x 4 bytes per head."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field and its accepted values."""
        _check_int("num_aux_heads", self.num_aux_heads, minimum=0)
        _check_choice("head_type", self.head_type, HEAD_TYPES)
        _check_int("layers_per_head", self.layers_per_head, minimum=1)
        _check_choice("head_init", self.head_init, HEAD_INITS)
        if not isinstance(self.separate_unembedding, bool):
            raise ValueError(f"separate_unembedding must be true or false, got {self.separate_unembedding!r}")
        _check_number("heads_coefficient", self.heads_coefficient, minimum=0.0)
        _check_number("decay", self.decay, minimum=0.0)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_int("loss_chunk_size", self.loss_chunk_size, minimum=1)

    # ----------------------------------------------------------------------------------------
    # Loss weights

    def schedule_value(self, progress: float) -> float:
        """Return s(t) for `progress` = t / T in [0, 1] (values outside are clamped)."""
        p = min(max(float(progress), 0.0), 1.0)
        if self.schedule == "rsine":
            return math.sin(math.pi / 2 * (1.0 - p))
        if self.schedule == "sine":
            return math.sin(math.pi / 2 * p)
        if self.schedule == "linear":
            return 1.0 - p
        return 1.0

    def head_weights(self, progress: float = 0.0) -> list[float]:
        """Return the loss weight of each auxiliary head at `progress`, head 2 first.

        The head predicting token t+k gets `heads_coefficient * s(progress) * decay**(k-1)`.
        """
        scale = self.heads_coefficient * self.schedule_value(progress)
        return [scale * self.decay ** (k - 1) for k in range(2, self.num_aux_heads + 2)]

    def same_structure(self, other: "CAFTConfig") -> bool:
        """Check whether heads built from `self` and from `other` have the same parameters."""
        return all(getattr(self, name) == getattr(other, name) for name in STRUCTURE_FIELDS)

    def with_loss_settings_of(self, other: "CAFTConfig") -> "CAFTConfig":
        """Return a copy with this config's head structure and `other`'s loss settings."""
        values = other.to_dict()
        values.update({name: getattr(self, name) for name in STRUCTURE_FIELDS})
        return CAFTConfig(**values)

    # ----------------------------------------------------------------------------------------
    # Serialisation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "CAFTConfig") -> "CAFTConfig":
        """Build a config from a mapping; unknown keys raise `ValueError` naming `source`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown CAFTConfig field(s) {unknown}; accepted fields are {sorted(known)}"
            )
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CAFTConfig":
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON in CAFT config: {error}") from error
        return cls.from_dict(values, source=str(path))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
