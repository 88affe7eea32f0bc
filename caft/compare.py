"""`caft compare`: next-token against CAFT fine-tuning, LoRA and full, over several seeds.

Every run starts from the same base model and trains on the same rows in the same order for a
given seed, with the same number of optimizer steps and batch size. Only the loss differs. All CAFT
runs share one set of heads, trained once on the frozen base model (or loaded with `heads`), as the
method prescribes. Each run is then scored on the same test rows with `caft eval`.

Outputs in `output_dir`:
- `runs/<method>-<mode>-seed<S>/`: each run's model, heads, metrics.json, eval.json, predictions;
- `results.json`: every run's metrics and, per method and metric, mean ± sd and the paired
  CAFT − next-token difference with its bootstrap interval (see `stats.py`);
- `results.md`: the same as a markdown table;
- `plots/training_curves.png` (per-head training loss) and `plots/metrics.png` (bars with seeds).

The comparison resumes: a run whose eval.json exists is not repeated, and a folder that holds a
comparison with other settings is refused.

Example config (YAML):
    task: chebi20
    model: ${CAFT_ASSETS}/models/stories260k
    output_dir: experiments/chebi20
    seeds: [0, 1, 2, 3, 4]
    prepare: {test_rows: 300}
    head_training: {data: outputs/distill.jsonl, steps: 300}
    finetune: {max_steps: 150, per_device_train_batch_size: 16}
    method_settings: {lora: {learning_rate: 2.0e-3}, full: {learning_rate: 5.0e-4}}
    eval: {batch_size: 32, max_new_tokens: 128}
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .assets import expand_path_variables
from .config import CAFTConfig
from .evaluate import EvalOptions, _write_json, run_eval
from .run_config import FinetuneConfig
from .stats import mean_and_sd, paired_bootstrap
from .tasks import get_task, prepare_task, write_jsonl

logger = logging.getLogger(__name__)

MODES = ("ntp", "caft")
METHODS = ("lora", "full")
# FinetuneConfig fields that the comparison itself sets for every run.
_RUN_FIELDS = {"model", "data", "output_dir", "seed", "mode", "method", "heads", "overwrite_output_dir", "resume"}


@dataclass
class CompareConfig:
    """Settings of `caft compare`. The field help doubles as documentation of the YAML keys."""

    task: str = field(metadata={"help": "Task preset name (see `caft tasks list`)."})
    model: str = field(metadata={"help": "Base model: a local folder or a Hub id."})
    output_dir: str = field(metadata={"help": "Folder for runs, tables and plots."})
    train_data: str | None = field(
        default=None, metadata={"help": "Training conversations; default: prepared from the task preset."}
    )
    test_data: str | None = field(
        default=None, metadata={"help": "Test file; default: prepared from the task preset."}
    )
    prepare: dict = field(
        default_factory=dict,
        metadata={"help": "Preset options when the data is prepared: test_rows, train_rows, max_prompt_chars."},
    )
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds; each runs every method and mode."})
    methods: list = field(default_factory=lambda: list(METHODS), metadata={"help": "Any of lora, full."})
    modes: list = field(default_factory=lambda: list(MODES), metadata={"help": "Any of ntp, caft."})
    heads: str | None = field(default=None, metadata={"help": "Trained heads for every CAFT run (folder or Hub id)."})
    head_training: dict = field(
        default_factory=dict,
        metadata={
            "help": "When `heads` is unset, train heads once on the frozen base: data (default: train_data), "
            "steps, learning_rate, per_device_train_batch_size."
        },
    )
    finetune: dict = field(default_factory=dict, metadata={"help": "FinetuneConfig options shared by all runs."})
    method_settings: dict = field(
        default_factory=dict, metadata={"help": "FinetuneConfig options per method, e.g. {lora: {learning_rate: 2e-3}}."}
    )
    caft: dict = field(default_factory=dict, metadata={"help": "CAFTConfig options (num_aux_heads, heads_coefficient, decay, ...)."})
    eval: dict = field(default_factory=dict, metadata={"help": "EvalOptions for scoring (batch_size, max_new_tokens, ...)."})
    bootstrap_samples: int = field(default=2000, metadata={"help": "Bootstrap draws for the intervals."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep each run's training checkpoints."})

    def __post_init__(self) -> None:
        get_task(self.task)
        for name, accepted in (("methods", METHODS), ("modes", MODES)):
            values = getattr(self, name)
            wrong = [value for value in values if value not in accepted]
            if wrong or not values:
                raise ValueError(f"{name} must be a non-empty list of {list(accepted)}, got {values!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}")
        unknown = set(self.finetune) - {item.name for item in fields(FinetuneConfig)}
        if unknown:
            raise ValueError(f"finetune: unknown options {sorted(unknown)}; see `caft finetune --help`")
        overridden = set(self.finetune) & _RUN_FIELDS
        if overridden:
            raise ValueError(f"finetune: {sorted(overridden)} are set by the comparison; use the top-level keys")
        for method, settings in self.method_settings.items():
            if method not in METHODS:
                raise ValueError(f"method_settings: unknown method {method!r}; use {list(METHODS)}")
            unknown = set(settings) - {item.name for item in fields(FinetuneConfig)}
            if unknown:
                raise ValueError(f"method_settings.{method}: unknown options {sorted(unknown)}")
        unknown = set(self.caft) - {item.name for item in fields(CAFTConfig)}
        if unknown:
            raise ValueError(
                f"caft: unknown options {sorted(unknown)}; accepted: {[item.name for item in fields(CAFTConfig)]}"
            )
        CAFTConfig(**self.caft)  # rejects invalid head settings now
        accepted_eval = {item.name for item in fields(EvalOptions)} - {"model", "task", "data", "output"}
        unknown = set(self.eval) - accepted_eval
        if unknown:
            raise ValueError(f"eval: unknown options {sorted(unknown)}; accepted: {sorted(accepted_eval)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> CompareConfig:
        accepted = {item.name for item in fields(cls)}
        unknown = set(values) - accepted
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; accepted keys: {sorted(accepted)}")
        missing = {"task", "model", "output_dir"} - set(values)
        if missing:
            raise ValueError(f"{source}: missing keys {sorted(missing)}")
        expanded = {
            key: expand_path_variables(value) if isinstance(value, str) else value for key, value in values.items()
        }
        if "head_training" in expanded and isinstance(expanded["head_training"].get("data"), str):
            expanded["head_training"] = {
                **expanded["head_training"],
                "data": expand_path_variables(expanded["head_training"]["data"]),
            }
        return cls(**expanded)


# ---------------------------------------------------------------------------------------------
# Running


def run_name(method: str, mode: str, seed: int) -> str:
    return f"{method}-{mode}-seed{seed}"


def _claim_output_dir(config: CompareConfig) -> None:
    """Record the settings, or check them against the comparison already in the folder."""
    output_dir = Path(config.output_dir)
    record = output_dir / "compare_config.json"
    current = portable_settings(config)
    if record.is_file():
        earlier = json.loads(record.read_text(encoding="utf-8"))
        # Adding seeds extends a comparison; any other change would mix runs of different settings.
        differences = sorted(key for key in current if key != "seeds" and earlier.get(key) != current[key])
        if differences:
            raise ValueError(
                f"{output_dir} contains a comparison with other settings ({', '.join(differences)} differ). "
                "Use another output_dir, or delete the folder to start over"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(record, current)


def portable_settings(config: CompareConfig) -> dict[str, Any]:
    """Return the settings with the assets folder written as ${CAFT_ASSETS}, so records compare across machines."""
    from .assets import assets_dir

    prefix = str(assets_dir())

    def portable(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(prefix, "${CAFT_ASSETS}")
        if isinstance(value, dict):
            return {key: portable(item) for key, item in value.items()}
        if isinstance(value, list):
            return [portable(item) for item in value]
        return value

    return portable(asdict(config))


def _prepared_data(config: CompareConfig) -> tuple[str, str]:
    if config.train_data and config.test_data:
        return config.train_data, config.test_data
    if config.train_data or config.test_data:
        raise ValueError("give both train_data and test_data, or neither to prepare them from the task preset")
    task = get_task(config.task)
    folder = Path(config.output_dir) / "data"
    train_path, test_path = folder / f"{task.name}.train.jsonl", folder / f"{task.name}.test.jsonl"
    if not (train_path.is_file() and test_path.is_file()):
        split = prepare_task(task, **config.prepare)
        if not split.train:
            raise ValueError(f"task {task.name!r} has no training split; give train_data and test_data")
        write_jsonl(split.train, train_path)
        write_jsonl(split.test, test_path)
        logger.info("Prepared %d training and %d test rows in %s", len(split.train), len(split.test), folder)
    return str(train_path), str(test_path)


def _shared_heads(config: CompareConfig, train_data: str) -> str | None:
    """Return the heads every CAFT run starts from, training them once when needed."""
    if config.heads:
        return config.heads
    if "caft" not in config.modes:
        return None
    folder = Path(config.output_dir) / "heads"
    if (folder / "heads" / "heads_config.json").is_file():
        return str(folder / "heads")
    from .pipeline import run_train_heads

    settings = dict(config.head_training)
    head_config = FinetuneConfig(
        model=config.model,
        data=settings.pop("data", train_data),
        output_dir=str(folder),
        seed=settings.pop("seed", 0),
        head_train_steps=settings.pop("steps", 200),
        overwrite_output_dir=True,
        **{key: value for key, value in config.finetune.items() if key in ("max_length", "dtype", "chat_template")},
        **settings,
    )
    logger.info("Training the shared heads once (%d steps) in %s", head_config.head_train_steps, folder)
    result = run_train_heads(head_config, CAFTConfig(**config.caft))
    return str(result.heads_dir)


def _run_settings(config: CompareConfig, method: str, mode: str, seed: int, train_data: str, heads: str | None):
    settings = {"save_steps": 10**9, **config.finetune, **config.method_settings.get(method, {})}
    run_dir = Path(config.output_dir) / "runs" / run_name(method, mode, seed)
    return run_dir, FinetuneConfig(
        model=config.model,
        data=train_data,
        output_dir=str(run_dir),
        seed=seed,
        mode=mode,
        method=method,
        heads=heads if mode == "caft" else None,
        overwrite_output_dir=True,
        **settings,
    )


def run_compare(config: CompareConfig) -> dict[str, Any]:
    """Run every (seed, method, mode) not done yet, then write the tables and plots."""
    from .pipeline import run_finetune

    _claim_output_dir(config)
    train_data, test_data = _prepared_data(config)
    heads = _shared_heads(config, train_data)
    plan = [(seed, method, mode) for seed in config.seeds for method in config.methods for mode in config.modes]
    for number, (seed, method, mode) in enumerate(plan, start=1):
        run_dir, finetune_config = _run_settings(config, method, mode, seed, train_data, heads)
        evaluation = run_dir / "eval.json"
        if evaluation.is_file():
            logger.info("Run %d/%d %s: done earlier, skipped", number, len(plan), run_dir.name)
            continue
        logger.info("Run %d/%d %s: fine-tuning", number, len(plan), run_dir.name)
        if not (run_dir / "model" / "config.json").is_file() or not (run_dir / "metrics.json").is_file():
            run_finetune(finetune_config, CAFTConfig(**config.caft))
        logger.info("Run %d/%d %s: evaluating", number, len(plan), run_dir.name)
        run_eval(
            EvalOptions(
                model=str(run_dir / "model"),
                task=config.task,
                data=test_data,
                output=str(evaluation),
                train_data=train_data,
                # NTP runs have no heads of their own; the shared heads on their trunk measure how well
                # its representation still supports multi-token prediction.
                heads=str(run_dir / "heads") if mode == "caft" else heads,
                seed=seed,
                **config.eval,
            )
        )
        if not config.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return write_report(config)


# ---------------------------------------------------------------------------------------------
# Report


def _load_runs(config: CompareConfig) -> dict[tuple[str, str, int], dict[str, Any]]:
    runs = {}
    for seed in config.seeds:
        for method in config.methods:
            for mode in config.modes:
                run_dir = Path(config.output_dir) / "runs" / run_name(method, mode, seed)
                evaluation = run_dir / "eval.json"
                if not evaluation.is_file():
                    continue
                report = json.loads(evaluation.read_text(encoding="utf-8"))
                metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
                runs[(method, mode, seed)] = {"eval": report, "history": metrics["phases"]["finetune"]["log_history"]}
    return runs


def _run_metrics(report: dict[str, Any]) -> dict[str, float]:
    values = {name: value for name, value in report.items() if isinstance(value, float) and name != "perplexity"}
    intrinsic = report.get("intrinsic")
    if intrinsic:
        values["perplexity"] = intrinsic["perplexity"]
        for head in intrinsic["heads"][1:]:
            values[f"head{head['head']}_top1"] = head["top1"]
    return values


def _per_row(report: dict[str, Any], metric: str) -> np.ndarray | None:
    key = report.get("per_sample_metrics", {}).get(metric)
    if key is None:
        return None
    return np.array([float(sample[key]) for sample in report["samples"]])


def summarise(config: CompareConfig, runs: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Summarise each (method, metric): mean ± sd per mode and the paired CAFT − NTP difference."""
    rows = []
    for method in config.methods:
        seeds = [seed for seed in config.seeds if all((method, mode, seed) in runs for mode in config.modes)]
        if not seeds:
            continue
        metric_names: list[str] = []
        for seed in seeds:
            for mode in config.modes:
                for name in _run_metrics(runs[(method, mode, seed)]["eval"]):
                    if name not in metric_names:
                        metric_names.append(name)
        for metric in metric_names:
            row: dict[str, Any] = {"method": method, "metric": metric, "seeds": seeds}
            per_seed = {}
            for mode in config.modes:
                values = [_run_metrics(runs[(method, mode, seed)]["eval"]).get(metric) for seed in seeds]
                if any(value is None for value in values):
                    break
                per_seed[mode] = values
                row[mode] = dict(zip(("mean", "sd"), mean_and_sd(values)), values=values)
            if set(per_seed) == {"ntp", "caft"} and len(seeds) < 2:
                # One seed gives no estimate of seed noise, so no interval is reported.
                mean = float(np.mean(per_seed["caft"]) - np.mean(per_seed["ntp"]))
                row["difference"] = {"mean": mean, "low": None, "high": None, "significant": None}
            elif set(per_seed) == {"ntp", "caft"}:
                caft_rows = [_per_row(runs[(method, "caft", seed)]["eval"], metric) for seed in seeds]
                ntp_rows = [_per_row(runs[(method, "ntp", seed)]["eval"], metric) for seed in seeds]
                if all(item is not None for item in caft_rows + ntp_rows):
                    treatment, control = np.stack(caft_rows), np.stack(ntp_rows)  # (S, N)
                else:
                    treatment, control = np.array(per_seed["caft"]), np.array(per_seed["ntp"])  # (S,)
                row["difference"] = paired_bootstrap(
                    treatment, control, samples=config.bootstrap_samples, seed=0
                ).to_dict()
            rows.append(row)
    return rows


def _format(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown_table(config: CompareConfig, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Task `{config.task}`, model `{portable_settings(config)['model']}`, seeds {config.seeds}. Mean ± sd over seeds; the "
        "difference is CAFT − NTP with its 95% paired bootstrap interval (over seeds, and over test rows "
        "where the metric is defined per row).",
        "",
    ]
    seeds = max((len(row["seeds"]) for row in rows), default=0)
    if 1 < seeds < 5:
        lines += [
            f"Only {seeds} seeds: a bootstrap over so few seeds understates the seed noise, so the intervals "
            "are too narrow. Use at least 5 seeds before reading a difference as significant.",
            "",
        ]
    lines += [
        "| method | metric | NTP | CAFT | CAFT − NTP [95% CI] | reading |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for mode in ("ntp", "caft"):
            if mode not in row:
                cells.append("–")
            elif len(row["seeds"]) < 2:
                cells.append(_format(row[mode]["mean"]))
            else:
                cells.append(f"{_format(row[mode]['mean'])} ± {_format(row[mode]['sd'])}")
        difference = row.get("difference")
        if difference and difference["significant"] is None:
            interval, reading = f"{difference['mean']:+.4f}", "one seed: no interval"
        elif difference:
            interval = (
                f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]"
            )
            if not difference["significant"]:
                reading = "no significant difference"
            else:
                lower_is_better = row["metric"] == "perplexity"
                better = (difference["mean"] < 0) if lower_is_better else (difference["mean"] > 0)
                reading = "CAFT better" if better else "NTP better"
        else:
            interval, reading = "–", "–"
        lines.append(f"| {row['method']} | {row['metric']} | {cells[0]} | {cells[1]} | {interval} | {reading} |")
    return "\n".join(lines) + "\n"


def _plot_training_curves(config: CompareConfig, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(config.methods), figsize=(6 * len(config.methods), 4), squeeze=False)
    colours = plt.get_cmap("viridis")
    for axis, method in zip(axes[0], config.methods):
        for mode, style in (("caft", "-"), ("ntp", "--")):
            histories = [runs[key]["history"] for key in runs if key[0] == method and key[1] == mode]
            if not histories:
                continue
            head = 1
            while any(f"head{head}_loss" in entry for entry in histories[0]):
                curves = {}
                for history in histories:
                    for entry in history:
                        if f"head{head}_loss" in entry and "step" in entry:
                            curves.setdefault(entry["step"], []).append(entry[f"head{head}_loss"])
                steps = sorted(curves)
                means = [float(np.mean(curves[step])) for step in steps]
                label = f"{mode.upper()} head {head}" + (" (next token)" if head == 1 else f" (t+{head})")
                axis.plot(steps, means, style, color=colours((head - 1) / 5), label=label)
                head += 1
        axis.set_title(f"{config.task}, {method}: training loss per head (mean over seeds)")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("cross-entropy")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_metrics(config: CompareConfig, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [name for name in dict.fromkeys(row["metric"] for row in rows) if not name.startswith("head")]
    columns = min(4, len(metrics))
    lines = -(-len(metrics) // columns)  # ceiling division
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.0 * lines), squeeze=False)
    for axis in axes.flat[len(metrics) :]:
        axis.set_visible(False)
    for axis, metric in zip(axes.flat, metrics):
        position = 0
        ticks, labels = [], []
        for method in config.methods:
            row = next((item for item in rows if item["method"] == method and item["metric"] == metric), None)
            if row is None:
                continue
            for mode, colour in (("ntp", "tab:gray"), ("caft", "tab:blue")):
                if mode not in row:
                    continue
                axis.bar(position, row[mode]["mean"], yerr=row[mode]["sd"], color=colour, alpha=0.6, capsize=3)
                axis.scatter([position] * len(row[mode]["values"]), row[mode]["values"], color="black", s=8, zorder=3)
                ticks.append(position)
                labels.append(f"{method}\n{mode}")
                position += 1
            position += 0.5
        axis.set_xticks(ticks, labels, fontsize=7)
        axis.set_title(metric, fontsize=9)
    figure.suptitle(f"{config.task}: mean ± sd over seeds (dots: single seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _write_run_scores(run_dir: Path, report: dict[str, Any]) -> None:
    """Write the run's numbers without any text of the test set: metrics and per-row scores by id.

    eval.json also holds the scorers' per-sample details, which quote references (canonical SMILES,
    sequences); scores.json is the compact record to publish beside the predictions.
    """
    per_sample = report.get("per_sample_metrics", {})
    content = {
        "metrics": _run_metrics(report),
        "generation": report.get("generation"),
        "intrinsic": report.get("intrinsic"),
        "ids": [sample["id"] for sample in report["samples"]],
        "per_row": {metric: [sample[key] for sample in report["samples"]] for metric, key in per_sample.items()},
    }
    _write_json(run_dir / "scores.json", content)


def write_report(config: CompareConfig) -> dict[str, Any]:
    """Write results.json, results.md, the plots and each run's scores.json; return the JSON object."""
    runs = _load_runs(config)
    if not runs:
        raise ValueError(f"{config.output_dir}: no finished runs to report")
    for (method, mode, seed), run in runs.items():
        _write_run_scores(Path(config.output_dir) / "runs" / run_name(method, mode, seed), run["eval"])
    rows = summarise(config, runs)
    output_dir = Path(config.output_dir)
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    _plot_training_curves(config, runs, plots / "training_curves.png")
    _plot_metrics(config, rows, plots / "metrics.png")
    table = markdown_table(config, rows)
    (output_dir / "results.md").write_text(table, encoding="utf-8")
    content = {
        "config": portable_settings(config),
        "summary": rows,
        "runs": [
            {"method": method, "mode": mode, "seed": seed, "metrics": _run_metrics(run["eval"])}
            for (method, mode, seed), run in sorted(runs.items(), key=lambda item: (item[0][2], item[0][0], item[0][1]))
        ],
    }
    _write_json(output_dir / "results.json", content)
    return content


def add_compare_command(commands: Any) -> None:
    """Register `caft compare` on the CLI's subparsers."""
    compare = commands.add_parser(
        "compare",
        help="Fine-tune with next-token and CAFT losses (LoRA and full) over seeds, evaluate, and compare.",
        description="Run the comparison described by a YAML config. Finished runs are skipped, so "
        "rerunning the command resumes.\n\nConfig keys:\n"
        + "\n".join(f"  {item.name}: {item.metadata['help']}" for item in fields(CompareConfig))
        + "\n\nExamples: the configs in experiments/ (chebi20.yaml, cfp-gen.yaml, dialogsum.yaml), "
        "explained in docs/experiments.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("--config", required=True, type=Path, help="YAML file of the comparison.")
    compare.add_argument("--output-dir", help="Overrides output_dir of the config.")
    compare.add_argument("--seeds", help="Comma-separated seeds; overrides the config's.")
    compare.add_argument(
        "--report-only", action="store_true", help="Only rewrite the tables and plots from finished runs."
    )
    compare.set_defaults(handler=command_compare)


def command_compare(args: Any) -> int:
    import yaml

    if not args.config.is_file():
        raise FileNotFoundError(f"config file not found: {args.config}")
    try:
        values = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{args.config}: not valid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{args.config}: expected a mapping of settings at the top level")
    if args.output_dir:
        values["output_dir"] = args.output_dir
    if args.seeds:
        try:
            values["seeds"] = [int(item) for item in args.seeds.split(",")]
        except ValueError as error:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from error
    config = CompareConfig.from_dict(values, source=str(args.config))
    content = write_report(config) if args.report_only else run_compare(config)
    print((Path(config.output_dir) / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {config.output_dir}/results.json, results.md and plots/ ({len(content['runs'])} runs)")
    return 0
