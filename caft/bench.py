"""`caft bench`: peak memory and step time of next-token, CAFT and stacked-logits CAFT training.

Each configuration is a random-init Llama-shaped model built from a `LlamaConfig` in code, so the
benchmark needs no download. For each configuration it measures one training step (forward,
backward, optimizer step) of these methods:

- "ntp": next-token fine-tuning, through `CAFTModel` with no heads attached;
- "caft": this library's CAFT loss with 4 auxiliary heads and default settings (heads frozen, as
  `CAFTTrainer` keeps them unless `train_heads=True`), each head's cross-entropy computed in chunks;
- "stacked": the same model and loss, written the way the public reference implementation
  (michaelchen-lab/caft-llm, `caft/core.py`) writes it: the next-token logits and every head's full
  logits stacked into one (n, B, T, V) tensor, then one cross-entropy;
- "heads" (full fine-tuning configurations only): head training with the trunk frozen, as
  `caft train-heads` runs it, for a tokens/s comparison with next-token training.

Every (configuration, method) pair runs in its own fresh Python process, so one method's peak
memory never includes another's. The parent starts the processes of one configuration, lets each
run its warm-up steps one after the other, then requests measured steps from them round-robin (the
starting method rotates each repeat), so machine noise hits all methods alike.

Memory on CPU is the kernel's peak resident set size (VmHWM) over the measured steps, reset through
/proc/self/clear_refs just before the first one, minus the resident set size at that moment. The
baseline is read after `malloc_trim`, so freed heap pages are not counted as in use. On CUDA it is
`torch.cuda.max_memory_allocated` over the measured steps minus `memory_allocated` before them.

Example:
    caft bench --quick --output benchmarks/quick.json --markdown docs/benchmarks-quick.md
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import logging
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)

METHODS = ("ntp", "caft", "stacked")
HEADS_METHOD = "heads"
NUM_AUX_HEADS = 4
LORA_RANK = 16  # `apply_lora`'s default rank, used by the FLOP count
ATTENTION_HEAD_DIM = 64
BYTES_PER_MB = 1024 * 1024
DEFAULT_OUTPUT = "benchmarks/results.json"
DEFAULT_MARKDOWN = "docs/benchmarks.md"

# Targets reported in the markdown page; the benchmark never fails on them.
TARGET_MEMORY_CAFT_OVER_NTP = 1.10
TARGET_TIME_VS_FLOPS_TOLERANCE = 0.10
TARGET_MEMORY_STACKED_OVER_CAFT = 10.0
TARGET_STACKED_VOCAB = 128256

NOTES_START = "<!-- notes:start -->"
NOTES_END = "<!-- notes:end -->"


@dataclass(frozen=True)
class BenchConfig:
    """One model and training set-up; every method of it runs on the same shapes and batch."""

    vocab: int
    finetuning: str  # "lora" or "full"
    dtype: str  # "bf16" or "fp32": weights, activations and optimizer state
    batch: int
    seq: int
    hidden: int
    layers: int
    intermediate: int
    heads: int = NUM_AUX_HEADS

    @property
    def name(self) -> str:
        return f"v{self.vocab // 1000}k-{self.finetuning}-{self.dtype}"

    @property
    def attention_heads(self) -> int:
        return max(1, self.hidden // ATTENTION_HEAD_DIM)

    def methods(self) -> tuple[str, ...]:
        # Head training never uses LoRA (the trunk is frozen), so it runs with the plain model of
        # the full fine-tuning configurations only.
        return METHODS + ((HEADS_METHOD,) if self.finetuning == "full" else ())


@dataclass(frozen=True)
class Preset:
    """A set of configurations with its repeat counts."""

    configs: tuple[BenchConfig, ...]
    repeats: int
    warmup: int


def _grid(vocabs, finetunings, dtypes, **shape) -> tuple[BenchConfig, ...]:
    return tuple(
        BenchConfig(vocab=vocab, finetuning=finetuning, dtype=dtype, **shape)
        for vocab in vocabs
        for finetuning in finetunings
        for dtype in dtypes
    )


VOCABS = (32000, 128256)  # Llama 2 and Llama 3 vocabulary sizes

PRESETS = {
    "full": Preset(
        _grid(VOCABS, ("lora", "full"), ("bf16", "fp32"), batch=2, seq=512, hidden=256, layers=2, intermediate=768),
        repeats=3,
        warmup=1,
    ),
    "quick": Preset(
        _grid(VOCABS, ("lora", "full"), ("bf16",), batch=2, seq=256, hidden=128, layers=2, intermediate=384),
        repeats=2,
        warmup=1,
    ),
    # For tests: one tiny configuration that runs in seconds.
    "smoke": Preset(
        _grid((4096,), ("full",), ("fp32",), batch=2, seq=64, hidden=64, layers=1, intermediate=128),
        repeats=1,
        warmup=1,
    ),
}


# ------------------------------------------------------------------------------------------------
# Analytic FLOP count


def step_flops(config: BenchConfig, method: str, lora_rank: int = LORA_RANK) -> float:
    """Count the matrix-multiply FLOPs of one training step (forward and backward) of `method`.

    A product of an (m, k) and a (k, n) matrix counts 2mkn. Backward through a linear layer costs
    one forward's FLOPs for the input gradient and one for the weight gradient. Either is skipped
    when nothing upstream requires it, because the weights are frozen or the input has no
    gradient. Norms, activations, softmax, the optimizer step and the embedding lookup are left out.
    """
    h, v, t = config.hidden, config.vocab, config.seq
    tokens = config.batch * t
    kv = h  # Llama config below uses as many key/value heads as query heads
    qkv = h * h + 2 * h * kv  # weights of the q, k and v projections
    layer_weights = qkv + h * h + 3 * h * config.intermediate  # + o, gate, up, down
    attention = 2 * t * h  # QK^T and AV per token, causal half of the T x T scores
    layer_forward = 2 * layer_weights + attention
    lora = method != HEADS_METHOD and config.finetuning == "lora"
    lora_forward = 0.0
    if lora:
        # Rank-r adapters on all 7 linear layers: A is (r, in) and B is (out, r).
        shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, config.intermediate), (h, config.intermediate)]
        shapes.append((config.intermediate, h))
        lora_forward = sum(2 * lora_rank * (fan_in + fan_out) for fan_in, fan_out in shapes)

    if method == HEADS_METHOD:
        return _heads_step_flops(config, tokens, layer_forward, layer_weights, attention)

    # Trunk: forward, then backward with input gradients everywhere except into the first layer's
    # q/k/v projections under LoRA (the frozen embedding output needs no gradient).
    trunk = config.layers * (layer_forward + lora_forward)
    if lora:
        trunk += config.layers * (2 * layer_weights + 2 * attention + 2 * lora_forward) - 2 * qkv
    else:
        trunk += config.layers * (4 * layer_weights + 2 * attention)
    unembedding = 2 * h * v
    unembedding_backward = unembedding * (1 if lora else 2)  # lm_head is frozen under LoRA
    if method == "caft":
        # Next-token logits only for the B(T-1) positions with a target, in recomputed chunks
        # (return_logits=False), so the forward runs twice.
        next_token_rows = config.batch * (t - 1)
        flops = tokens * trunk + next_token_rows * (2 * unembedding + unembedding_backward)
    else:
        flops = tokens * (trunk + unembedding + unembedding_backward)
    if method == "ntp":
        return float(flops)

    # Heads (frozen in "caft" mode): forward, and backward for the input gradient only.
    flops += config.heads * tokens * (layer_forward + 2 * layer_weights + 2 * attention)
    for offset in range(2, config.heads + 2):
        if method == "stacked":
            rows = tokens  # logits for every position, targets or not
            flops += rows * (unembedding + unembedding_backward)
        else:
            rows = config.batch * max(t - offset, 0)  # only positions with a target
            flops += rows * (2 * unembedding + unembedding_backward)  # + forward recomputed in backward
    return float(flops)


def _heads_step_flops(config: BenchConfig, tokens: int, layer_forward: int, layer_weights: int, attention: int) -> float:
    """FLOPs of a "heads" step: frozen trunk forward, heads trained, frozen unembedding."""
    h, v, t = config.hidden, config.vocab, config.seq
    unembedding = 2 * h * v
    flops = tokens * config.layers * layer_forward
    flops += config.batch * (t - 1) * unembedding  # next-token loss, no gradient
    # A head's input has no gradient: the weight gradients run, and input gradients only into the
    # o and down projections, whose inputs come from trainable weights.
    head_backward = 2 * layer_weights + 2 * (config.hidden * config.hidden + config.hidden * config.intermediate)
    flops += config.heads * tokens * (layer_forward + head_backward + 2 * attention)
    for offset in range(2, config.heads + 2):
        rows = config.batch * max(t - offset, 0)
        flops += rows * 3 * unembedding  # forward, forward again in backward, input gradient
    return float(flops)


# ------------------------------------------------------------------------------------------------
# Worker process: builds one (configuration, method) and runs steps on request


def _build_model(config: BenchConfig, method: str):
    """Return (caft_model, optimizer, batch) for `method` on a fresh random-init Llama model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .config import CAFTConfig
    from .lora import apply_lora, prepare_full_finetuning
    from .model import add_auxiliary_heads

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype]
    llama_config = LlamaConfig(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.attention_heads,
        num_key_value_heads=config.attention_heads,
        max_position_embeddings=config.seq,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(llama_config).to(dtype)
    num_heads = 0 if method == "ntp" else config.heads
    caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=num_heads))

    if method == HEADS_METHOD:
        caft_model.set_trainable(trunk=False, heads=True)
    elif config.finetuning == "lora":
        apply_lora(caft_model)
        caft_model.set_trainable(heads=False)
    else:
        prepare_full_finetuning(caft_model)
        caft_model.set_trainable(heads=False)
    caft_model.train()

    trainable = [parameter for parameter in caft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.vocab, (config.batch, config.seq), generator=generator)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }
    return caft_model, optimizer, batch


def stacked_caft_loss(caft_model, input_ids, attention_mask, labels, progress: float = 0.0):
    """Compute the CAFT loss with all logits stacked into one tensor, as the reference implementation does.

    The base model's next-token logits and each head's (B, T, V) logits are stacked into one
    (n, B, T, V) tensor, as michaelchen-lab/caft-llm (`caft/core.py`) does. The stack is upcast to
    fp32, as transformers' own causal-LM loss upcasts, and one cross-entropy runs over it. (The
    reference keeps its logits' dtype and runs one cross-entropy per slice of the same stack.) The
    loss equals `caft_model(..., mode="caft").loss`.
    """
    import torch
    import torch.nn.functional as F

    from .architecture import capture_layer_call, last_decoder_layer
    from .loss import IGNORE_INDEX, shift_targets

    layer = last_decoder_layer(caft_model.model, caft_model.parts)
    with capture_layer_call(layer, keep_output=False) as calls:
        output = caft_model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    call = calls[0]
    logits = [output.logits] + [caft_model._project(head(call), head) for head in caft_model.heads]
    stacked = torch.stack(logits)  # (n, B, T, V)
    del logits, output
    num_predictions, vocab = stacked.shape[0], stacked.shape[-1]

    targets = torch.stack(
        [shift_targets(labels, offset, attention_mask) for offset in range(1, num_predictions + 1)]
    )  # (n, B, T)
    token_losses = F.cross_entropy(
        stacked.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(num_predictions, -1)
    counts = (targets != IGNORE_INDEX).reshape(num_predictions, -1).sum(dim=1).clamp(min=1)
    head_losses = token_losses.sum(dim=1) / counts  # (n,) mean loss per prediction offset
    weights = torch.tensor([1.0] + caft_model.caft_config.head_weights(progress), device=head_losses.device)
    return (weights * head_losses).sum()


class _MemoryMeter:
    """Peak memory above a baseline, over the steps run after `start`."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline_mb = 0.0
        self.peak_source = "cuda.max_memory_allocated" if device == "cuda" else "VmHWM"

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / BYTES_PER_MB
            return
        _release_free_heap()
        self.baseline_mb = _proc_status_mb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError as error:
            raise RuntimeError(
                f"cannot reset the peak resident set size through /proc/self/clear_refs ({error}); "
                "the CPU memory measurement needs Linux 4.0 or later with a writable /proc"
            ) from error

    def peak_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / BYTES_PER_MB
        return _proc_status_mb("VmHWM")


def _proc_status_mb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def _release_free_heap() -> None:
    """Return freed heap pages to the kernel (glibc `malloc_trim`), so RSS counts live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        logger.debug("malloc_trim is not available (not glibc); RSS may include freed heap pages")


class _StepRunner:
    def __init__(self, config: BenchConfig, method: str, device: str) -> None:
        import torch

        self.config = config
        self.method = method
        self.device = device
        self.caft_model, self.optimizer, self.batch = _build_model(config, method)
        if device == "cuda":
            self.caft_model.to(device)
            self.batch = {key: value.to(device) for key, value in self.batch.items()}
            self.optimizer = torch.optim.AdamW(
                [parameter for parameter in self.caft_model.parameters() if parameter.requires_grad], lr=1e-5
            )
        self.meter = _MemoryMeter(device)
        self.measuring = False

    def loss(self):
        if self.method == "stacked":
            return stacked_caft_loss(self.caft_model, **self.batch)
        # The call CAFTTrainer makes: no full logits are returned, so the CAFT next-token loss is
        # chunked like the heads' losses. In "ntp" mode the flag changes nothing (full logits).
        return self.caft_model(**self.batch, mode=self.method, return_logits=False).loss

    def step(self) -> float:
        """Run forward, backward and the optimizer step; return the wall time in seconds."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def counts(self) -> dict[str, int]:
        parameters = list(self.caft_model.parameters())
        return {
            "parameters": sum(parameter.numel() for parameter in parameters),
            "trainable_parameters": sum(parameter.numel() for parameter in parameters if parameter.requires_grad),
        }


def _worker_main() -> int:
    """Serve one (configuration, method): read JSON commands on stdin, write JSON replies on stdout.

    Commands: {"warmup": N} runs N untimed steps; {"step": true} runs one measured step (the first
    one starts the memory meter); {"report": true} returns the peak memory and exits.
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    spec = json.loads(sys.stdin.readline())
    config = BenchConfig(**spec["config"])
    started = time.perf_counter()
    runner = _StepRunner(config, spec["method"], spec["device"])
    replies.write(json.dumps({"ready": True, "build_s": time.perf_counter() - started, **runner.counts()}) + "\n")

    for line in sys.stdin:
        command = json.loads(line)
        if "warmup" in command:
            times = [runner.step() for _ in range(command["warmup"])]
            replies.write(json.dumps({"warmup_s": times}) + "\n")
        elif "step" in command:
            if not runner.measuring:
                runner.meter.start()
                runner.measuring = True
            replies.write(json.dumps({"time_s": runner.step()}) + "\n")
        elif "report" in command:
            peak = runner.meter.peak_mb()
            replies.write(
                json.dumps(
                    {"baseline_mb": runner.meter.baseline_mb, "peak_mb": peak, "source": runner.meter.peak_source}
                )
                + "\n"
            )
            return 0
    return 0


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, config: BenchConfig, method: str, device: str) -> None:
        self.method = method
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "caft.bench", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.send({"config": asdict(config), "method": method, "device": device})

    def send(self, command: dict[str, Any]) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(
                f"benchmark worker for method {self.method!r} exited with code {code} before replying "
                "(out of memory? see its error output above)"
            )
        return json.loads(line)

    def request(self, command: dict[str, Any]) -> dict[str, Any]:
        self.send(command)
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# ------------------------------------------------------------------------------------------------
# Parent: run the configurations and collect rows


def run_config(config: BenchConfig, repeats: int, warmup: int, device: str) -> list[dict[str, Any]]:
    """Measure every method of `config`, interleaved; return one row per method."""
    methods = config.methods()
    workers = {method: _Worker(config, method, device) for method in methods}
    try:
        info = {method: worker.receive() for method, worker in workers.items()}
        for method, worker in workers.items():
            reply = worker.request({"warmup": warmup})
            logger.info("%s %s: built in %.1f s, warm-up %s s", config.name, method,
                        info[method]["build_s"], ", ".join(f"{value:.2f}" for value in reply["warmup_s"]))

        times: dict[str, list[float]] = {method: [] for method in methods}
        for repeat in range(repeats):
            shift = repeat % len(methods)
            for method in methods[shift:] + methods[:shift]:
                times[method].append(workers[method].request({"step": True})["time_s"])
            logger.info(
                "%s repeat %d/%d: %s",
                config.name,
                repeat + 1,
                repeats,
                ", ".join(f"{method} {times[method][-1]:.2f} s" for method in methods),
            )
        memory = {method: worker.request({"report": True}) for method, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()

    rows = []
    for method in methods:
        median = statistics.median(times[method])
        rows.append(
            {
                "config": config.name,
                "method": method,
                **asdict(config),
                "device": device,
                "peak_memory_mb": round(memory[method]["peak_mb"] - memory[method]["baseline_mb"], 1),
                "baseline_memory_mb": round(memory[method]["baseline_mb"], 1),
                "total_peak_memory_mb": round(memory[method]["peak_mb"], 1),
                "memory_source": memory[method]["source"],
                "step_time_s": round(median, 4),
                "min_time_s": round(min(times[method]), 4),
                "max_time_s": round(max(times[method]), 4),
                "times_s": [round(value, 4) for value in times[method]],
                "repeats": repeats,
                "warmup": warmup,
                "tokens_per_s": round(config.batch * config.seq / median, 1),
                "flops": step_flops(config, method),
                "parameters": info[method]["parameters"],
                "trainable_parameters": info[method]["trainable_parameters"],
            }
        )
    return rows


def run_benchmark(
    configs: Sequence[BenchConfig], repeats: int, warmup: int, device: str
) -> list[dict[str, Any]]:
    """Run every configuration in order; return all rows."""
    rows: list[dict[str, Any]] = []
    for index, config in enumerate(configs, start=1):
        load = os.getloadavg()[0]
        logger.info(
            "configuration %d/%d: %s (batch %d, seq %d, hidden %d, layers %d)",
            index, len(configs), config.name, config.batch, config.seq, config.hidden, config.layers,
        )
        started = time.perf_counter()
        config_rows = run_config(config, repeats, warmup, device)
        for row in config_rows:
            row["load_1min_at_start"] = round(load, 2)
        rows.extend(config_rows)
        logger.info("configuration %d/%d done in %.0f s", index, len(configs), time.perf_counter() - started)
    return rows


def select_configs(preset: Preset, names: Iterable[str] | None) -> tuple[BenchConfig, ...]:
    """Return the preset's configurations whose name is in `names` (all when `names` is None)."""
    if names is None:
        return preset.configs
    requested = list(names)
    known = {config.name: config for config in preset.configs}
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; this preset has {sorted(known)}")
    return tuple(known[name] for name in requested)


# ------------------------------------------------------------------------------------------------
# Ratios, targets and the markdown page


def compute_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return, per configuration, the CAFT/NTP and stacked/CAFT ratios of memory, time and FLOPs."""
    by_config: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["method"]] = row
    ratios = []
    for name, methods in by_config.items():
        ntp, caft, stacked = methods["ntp"], methods["caft"], methods["stacked"]
        entry = {
            "config": name,
            "vocab": caft["vocab"],
            "caft_ntp_memory": _ratio(caft["peak_memory_mb"], ntp["peak_memory_mb"]),
            "caft_ntp_total_memory": _ratio(caft["total_peak_memory_mb"], ntp["total_peak_memory_mb"]),
            "caft_ntp_time": _ratio(caft["step_time_s"], ntp["step_time_s"]),
            "caft_ntp_flops": _ratio(caft["flops"], ntp["flops"]),
            "stacked_caft_memory": _ratio(stacked["peak_memory_mb"], caft["peak_memory_mb"]),
            "stacked_caft_time": _ratio(stacked["step_time_s"], caft["step_time_s"]),
            "stacked_caft_flops": _ratio(stacked["flops"], caft["flops"]),
        }
        if HEADS_METHOD in methods:
            entry["heads_tokens_per_s"] = methods[HEADS_METHOD]["tokens_per_s"]
            entry["ntp_tokens_per_s"] = ntp["tokens_per_s"]
            entry["heads_ntp_throughput"] = _ratio(methods[HEADS_METHOD]["tokens_per_s"], ntp["tokens_per_s"])
            entry["heads_ntp_flops"] = _ratio(methods[HEADS_METHOD]["flops"], ntp["flops"])
        ratios.append(entry)
    return ratios


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def evaluate_targets(ratios: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check each target on each configuration it applies to."""
    results = []
    for entry in ratios:
        results.append(
            {
                "config": entry["config"],
                "target": f"peak memory CAFT/NTP <= {TARGET_MEMORY_CAFT_OVER_NTP:.2f}",
                "value": f"{entry['caft_ntp_memory']:.2f}",
                "met": entry["caft_ntp_memory"] <= TARGET_MEMORY_CAFT_OVER_NTP,
            }
        )
        deviation = entry["caft_ntp_time"] / entry["caft_ntp_flops"] - 1
        results.append(
            {
                "config": entry["config"],
                "target": f"time CAFT/NTP within {TARGET_TIME_VS_FLOPS_TOLERANCE:.0%} of the FLOP ratio",
                "value": f"{entry['caft_ntp_time']:.2f} vs {entry['caft_ntp_flops']:.2f} ({deviation:+.0%})",
                "met": abs(deviation) <= TARGET_TIME_VS_FLOPS_TOLERANCE,
            }
        )
        if entry["vocab"] == TARGET_STACKED_VOCAB:
            results.append(
                {
                    "config": entry["config"],
                    "target": f"peak memory stacked/CAFT >= {TARGET_MEMORY_STACKED_OVER_CAFT:.0f} at 128k",
                    "value": f"{entry['stacked_caft_memory']:.2f}",
                    "met": entry["stacked_caft_memory"] >= TARGET_MEMORY_STACKED_OVER_CAFT,
                }
            )
    return results


def machine_info(device: str) -> dict[str, Any]:
    """Describe the machine: CPU model, cores, RAM, library versions and the device."""
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = float("nan")
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if match:
            ram_gb = int(match.group(1)) / 1024**2
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(ram_gb, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Format rows as a plain-text table, one line per (configuration, method)."""
    lines = [
        f"{'configuration':<18} {'method':<8} {'peak MB':>9} {'step s':>8} {'min-max s':>13} {'tokens/s':>9} {'GFLOP':>8}"
    ]
    for row in rows:
        lines.append(
            f"{row['config']:<18} {row['method']:<8} {row['peak_memory_mb']:>9.0f} {row['step_time_s']:>8.2f} "
            f"{row['min_time_s']:>6.2f}-{row['max_time_s']:<6.2f} {row['tokens_per_s']:>9.0f} "
            f"{row['flops'] / 1e9:>8.1f}"
        )
    return "\n".join(lines)


def _distill_status() -> str:
    try:
        import importlib.util

        present = importlib.util.find_spec("caft.distill") is not None
    except (ImportError, ValueError):
        present = False
    if present:
        return (
            "**Distillation generation (`caft distill`): not measured by `caft bench`.** "
            "`caft distill` prints the generated tokens/s of each run when it finishes."
        )
    return "Distillation generation throughput is not measured yet (`caft.distill` does not exist)."


def render_markdown(
    rows: Sequence[dict[str, Any]],
    machine: dict[str, Any],
    command: str,
    started: datetime.datetime,
    wall_s: float,
    notes: str = "",
) -> str:
    """Build the benchmark page: machine, command, per-configuration tables, ratios and targets."""
    ratios = compute_ratios(rows)
    targets = evaluate_targets(ratios)
    loads = list(dict.fromkeys(row["load_1min_at_start"] for row in rows))
    out: list[str] = ["# Benchmarks: memory and step time of the CAFT loss", ""]
    out += [
        f"Measured on {started:%Y-%m-%d} ({started:%H:%M} local time), {wall_s / 60:.1f} minutes in all, with:",
        "",
        "```",
        command,
        "```",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {machine['cpu']} |",
        f"| cores | {machine['cores']} ({machine['torch_threads']} torch threads) |",
        f"| RAM | {machine['ram_gb']} GB |",
        f"| device | {machine['device']}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''} |",
        f"| torch / transformers / Python | {machine['torch']} / {machine['transformers']} / {machine['python']} |",
        f"| 1-minute load average at the start of each configuration (from the second on, it includes "
        f"this benchmark's own {machine['torch_threads']} threads) | {', '.join(f'{value:.2f}' for value in loads)} |",
        "",
    ]
    out += _method_section()
    out += _targets_section(targets)
    out += _ratios_section(ratios)
    out += _heads_section(ratios)
    out += _configuration_sections(rows)
    out += _flops_section()
    out += ["## Notes", "", NOTES_START, notes.strip() or "No notes yet.", NOTES_END, ""]
    return "\n".join(out)


def _method_section() -> list[str]:
    return [
        "## What is measured",
        "",
        "Each configuration is a random-init Llama model built from a `LlamaConfig` in code (4 attention "
        "heads of 64 per 256 hidden, no grouped-query attention, untied unembedding). The batch is random "
        "token ids with every position a target (no prompt masking, no padding), so the chunked loss gets "
        "no saving from skipped positions. One step is forward, backward, `AdamW.step()` and "
        "`zero_grad(set_to_none=True)`. bf16 means weights, activations and optimizer state in bf16; every "
        "cross-entropy upcasts its logits to fp32.",
        "",
        "- **ntp**: next-token fine-tuning, `CAFTModel` with `num_aux_heads=0`, `mode=\"ntp\"`.",
        "- **caft**: this library, 4 transformer heads (copies of the last decoder layer), default "
        "`CAFTConfig` (`loss_chunk_size=1024`), `mode=\"caft\"`, called as `CAFTTrainer` calls it "
        "(`return_logits=False`): the next-token loss is also computed in chunks from the last layer's "
        "output, so no (B, T, V) logits exist. The heads are frozen, as `CAFTTrainer` keeps them by "
        "default; gradients flow through them into the trunk.",
        "- **stacked**: the same model and loss, computed the way the public reference implementation "
        "(michaelchen-lab/caft-llm) computes it. The next-token logits and the 4 heads' full (B, T, V) "
        "logits are stacked into one (5, B, T, V) tensor and upcast to fp32, then one cross-entropy runs "
        "over it (`caft.bench.stacked_caft_loss`). The reference keeps the logits' dtype and runs one "
        "cross-entropy per slice of the same stack.",
        "- **heads**: `mode=\"heads\"`, trunk frozen and run without a graph, heads trained "
        "(full fine-tuning configurations only, because head training uses the plain model).",
        "- LoRA: `apply_lora` defaults (rank 16, alpha 32, dropout 0.05, all linear layers except the "
        "unembedding). Full: every base parameter trainable.",
        "",
        "Every (configuration, method) runs in its own fresh process. After the warm-up step(s) the parent "
        "requests one step from each method in turn, rotating which method goes first each repeat, so "
        "machine noise hits all methods alike. Times are medians with min–max over the repeats.",
        "",
        "**Peak memory** on CPU is the peak resident set size over the measured steps minus the resident "
        "set size just before the first one. The kernel's own high-water mark (`VmHWM` in "
        "/proc/self/status) is reset through /proc/self/clear_refs right before the first measured step. "
        "Unlike a sampling thread it cannot miss a short-lived peak, and unlike `ru_maxrss` it does not "
        "include the warm-up step or model construction. Just before the baseline is read, glibc's "
        "`malloc_trim(0)` returns freed heap pages, so the baseline counts live memory (weights, optimizer "
        "state) only. The baseline therefore contains the heads' parameters: \"peak MB\" is what one step "
        "adds on top of the loaded model and optimizer. \"total MB\" is the whole process. "
        "On CUDA the same difference is taken from `torch.cuda.max_memory_allocated` after "
        "`reset_peak_memory_stats`.",
        "",
    ]


def _targets_section(targets: Sequence[dict[str, Any]]) -> list[str]:
    out = [
        "## Targets",
        "",
        "Targets are reported here only; the benchmark and the tests never fail on them.",
        "",
        "| configuration | target | measured | |",
        "|---|---|---|---|",
    ]
    for target in targets:
        out.append(
            f"| {target['config']} | {target['target']} | {target['value']} | {'met' if target['met'] else '**missed**'} |"
        )
    return out + [""]


def _ratios_section(ratios: Sequence[dict[str, Any]]) -> list[str]:
    out = [
        "## Ratios",
        "",
        "Memory ratios compare peak memory above the loaded model (\"peak MB\"); the total column compares "
        "whole-process peaks. The FLOP ratio is the analytic count below; time/FLOPs is the measured "
        "time ratio divided by it.",
        "",
        "| configuration | CAFT/NTP memory | CAFT/NTP total memory | CAFT/NTP time | CAFT/NTP FLOPs | "
        "time/FLOPs | stacked/CAFT memory | stacked/CAFT time | stacked/CAFT FLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in ratios:
        out.append(
            f"| {entry['config']} | {entry['caft_ntp_memory']:.2f} | {entry['caft_ntp_total_memory']:.2f} | "
            f"{entry['caft_ntp_time']:.2f} | {entry['caft_ntp_flops']:.2f} | "
            f"{entry['caft_ntp_time'] / entry['caft_ntp_flops']:.2f} | {entry['stacked_caft_memory']:.2f} | "
            f"{entry['stacked_caft_time']:.2f} | {entry['stacked_caft_flops']:.2f} |"
        )
    return out + [""]


def _heads_section(ratios: Sequence[dict[str, Any]]) -> list[str]:
    out = [
        "## Head training throughput",
        "",
        "Tokens per second of a head-training step (`mode=\"heads\"`, trunk frozen) against a next-token "
        "full fine-tuning step of the same configuration.",
        "",
        "| configuration | heads tokens/s | NTP tokens/s | heads/NTP throughput | NTP/heads FLOPs |",
        "|---|---|---|---|---|",
    ]
    for entry in ratios:
        if "heads_tokens_per_s" not in entry:
            continue
        out.append(
            f"| {entry['config']} | {entry['heads_tokens_per_s']:.0f} | {entry['ntp_tokens_per_s']:.0f} | "
            f"{entry['heads_ntp_throughput']:.2f} | {1 / entry['heads_ntp_flops']:.2f} |"
        )
    return out + ["", _distill_status(), ""]


def _configuration_sections(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["## Results per configuration", ""]
    configs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        configs.setdefault(row["config"], []).append(row)
    for name, config_rows in configs.items():
        first = config_rows[0]
        out += [
            f"### {name}",
            "",
            f"vocab {first['vocab']}, {first['finetuning']} fine-tuning, {first['dtype']}, batch {first['batch']} "
            f"x seq {first['seq']}, hidden {first['hidden']}, {first['layers']} layers, intermediate "
            f"{first['intermediate']}, {first['heads']} auxiliary heads; {first['repeats']} repeats after "
            f"{first['warmup']} warm-up step(s).",
            "",
            "| method | peak MB | total MB | step s (median) | min–max s | tokens/s | GFLOP/step | trainable params |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in config_rows:
            out.append(
                f"| {row['method']} | {row['peak_memory_mb']:.0f} | {row['total_peak_memory_mb']:.0f} | "
                f"{row['step_time_s']:.2f} | {row['min_time_s']:.2f}–{row['max_time_s']:.2f} | "
                f"{row['tokens_per_s']:.0f} | {row['flops'] / 1e9:.1f} | {row['trainable_parameters']:,} |"
            )
        out.append("")
    return out


def _flops_section() -> list[str]:
    return [
        "## FLOP count",
        "",
        "`caft.bench.step_flops` counts matrix-multiply FLOPs (2mkn for an (m, k) x (k, n) product) per "
        "step, with N = B·T tokens, H hidden, I intermediate, V vocabulary, L layers, n = 4 heads, r = 16:",
        "",
        "- layer weights P = 4H² + 3HI; layer forward F = 2P + 2TH per token (QKᵀ and AV over the causal "
        "half of the scores);",
        "- trunk, full fine-tuning: L·(F + 4P + 4TH) per token (input and weight gradients);",
        "- trunk, LoRA: L·(F + 2P + 4TH) per token for the frozen weights (input gradients only, none into "
        "the first layer's q, k, v because the frozen embedding needs none), plus 3·2r(in+out) per "
        "adapted linear layer;",
        "- unembedding: 2HV per token forward, the same again for the input gradient, and again for the "
        "weight gradient under full fine-tuning (it is frozen under LoRA);",
        "- caft and stacked add n frozen head layers: F + 2P + 4TH per token each (input gradients only);",
        "- caft: the next-token unembedding (k = 1) and each head's (k = 2..5) run on the B·(T−k) "
        "positions with a target: forward, the forward again in backward (the chunked loss recomputes it), "
        "the input gradient, and the weight gradient under full fine-tuning;",
        "- stacked: each head's unembedding runs on all N positions: forward, input gradient, and weight "
        "gradient under full fine-tuning;",
        "- heads: trunk forward only, next-token logits without gradient, head layers with weight "
        "gradients and input gradients into o and down only, each head's unembedding 3 times (frozen).",
        "",
        "Not counted: norms, activations, softmax and cross-entropy, the top-1/top-5 counts, the optimizer "
        "step and the embedding gradient. They are small in FLOPs but memory-bound on a CPU, so measured "
        "time ratios can differ from FLOP ratios where they matter.",
        "",
    ]


def read_notes(path: Path) -> str:
    """Return the hand-written notes section of an existing page, so a new run keeps it."""
    if not path.is_file():
        return ""
    text = path.read_text()
    start, end = text.find(NOTES_START), text.find(NOTES_END)
    if start < 0 or end < start:
        return ""
    notes = text[start + len(NOTES_START) : end].strip()
    return "" if notes == "No notes yet." else notes


# ------------------------------------------------------------------------------------------------
# Command line


def add_bench_command(commands) -> None:
    """Register `caft bench` on the `caft` sub-command parser."""
    bench = commands.add_parser(
        "bench",
        help="Measure peak memory and step time of next-token, CAFT and stacked-logits CAFT training.",
        description="Benchmark random-init Llama models: next-token, CAFT (chunked loss) and stacked-logits "
        "CAFT training steps, each in a fresh process, methods interleaved across repeats. The full "
        "preset took 13 minutes on an idle 2-core AMD EPYC and peaks near 12 GB of RAM; --quick took 2.",
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="Smaller models and fewer configurations (minutes).")
    size.add_argument("--smoke", action="store_true", help="One tiny configuration, for tests (seconds).")
    bench.add_argument(
        "--configs",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        metavar="NAMES",
        help="Comma-separated configuration names of the preset to run, e.g. v32k-lora-bf16. Default: all.",
    )
    bench.add_argument("--repeats", type=int, default=None, help="Measured steps per method. Default: per preset.")
    bench.add_argument("--warmup", type=int, default=None, help="Untimed steps per method. Default: per preset.")
    bench.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="Device to run on; 'auto' takes CUDA when available. Default: auto.",
    )
    bench.add_argument("--output", type=Path, default=Path(DEFAULT_OUTPUT), help=f"JSON rows. Default: {DEFAULT_OUTPUT}.")
    bench.add_argument(
        "--markdown", type=Path, default=Path(DEFAULT_MARKDOWN), help=f"Markdown page. Default: {DEFAULT_MARKDOWN}."
    )
    bench.set_defaults(handler=command_bench)


def command_bench(args: argparse.Namespace) -> int:
    if args.smoke:
        preset_name = "smoke"
    elif args.quick:
        preset_name = "quick"
    else:
        preset_name = "full"
    preset = PRESETS[preset_name]
    configs = select_configs(preset, args.configs)
    repeats = args.repeats if args.repeats is not None else preset.repeats
    warmup = args.warmup if args.warmup is not None else preset.warmup
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    device = _resolve_device(args.device)

    started = datetime.datetime.now()
    clock = time.perf_counter()
    logger.info("caft bench: preset %s, %d configuration(s), device %s", preset_name, len(configs), device)
    rows = run_benchmark(configs, repeats, warmup, device)
    wall_s = time.perf_counter() - clock

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2) + "\n")
    command = _command_text(args, preset_name)
    page = render_markdown(rows, machine_info(device), command, started, wall_s, read_notes(args.markdown))
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(page)

    print(format_table(rows))
    print()
    for entry in compute_ratios(rows):
        print(
            f"{entry['config']}: CAFT/NTP memory {entry['caft_ntp_memory']:.2f}, time {entry['caft_ntp_time']:.2f} "
            f"(FLOPs {entry['caft_ntp_flops']:.2f}); stacked/CAFT memory {entry['stacked_caft_memory']:.2f}, "
            f"time {entry['stacked_caft_time']:.2f}"
        )
    print(f"\nrows: {args.output}\npage: {args.markdown}\ntotal: {wall_s:.0f} s")
    return 0


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    return choice


def _command_text(args: argparse.Namespace, preset_name: str) -> str:
    """Rebuild the command line from the parsed options, with every output path spelled out."""
    parts = ["caft", "bench"]
    if preset_name != "full":
        parts.append(f"--{preset_name}")
    if args.configs:
        parts += ["--configs", ",".join(args.configs)]
    if args.repeats is not None:
        parts += ["--repeats", str(args.repeats)]
    if args.warmup is not None:
        parts += ["--warmup", str(args.warmup)]
    if args.device != "auto":
        parts += ["--device", args.device]
    parts += ["--output", str(args.output), "--markdown", str(args.markdown)]
    return " ".join(shlex.quote(part) for part in parts)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(_worker_main())
