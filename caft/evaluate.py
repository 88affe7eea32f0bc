"""`caft eval`: answer a task's test prompts with a fine-tuned model, score the answers, and
measure intrinsic metrics (per-head loss and accuracy, perplexity) on the gold answers.

Generation reuses the batched, left-padded generator of `caft distill`, so batched greedy output
equals one-prompt-at-a-time output. Prompts are rendered with the chat template the model was
trained with (exported models carry it in their tokenizer). Prompts are sorted by length before
batching to waste less compute on padding; the output keeps the test file's order.

Example:
    >>> options = EvalOptions(model="outputs/run/model", task="chebi20", data="chebi20.test.jsonl",
    ...                       output="outputs/run/eval.json")
    >>> report = run_eval(options)
    >>> report["metrics"]["validity"]
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .tasks import Task, get_task, load_references, write_jsonl

logger = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """Settings of `caft eval`. The field help doubles as CLI help."""

    model: str = field(metadata={"help": "Fine-tuned model folder (for example OUTPUT_DIR/model) or Hub id."})
    task: str = field(
        metadata={"help": "Task preset, which picks the prompt and the scorer: humaneval, mbpp, gsm8k, "
                  "dialogsum, chebi20 or cfp-gen."}
    )
    data: str = field(metadata={"help": "Test file: prepared by `caft tasks prepare`, or the task's raw file."})
    output: str = field(metadata={"help": "Where to write the scores (JSON)."})
    train_data: str | None = field(
        default=None, metadata={"help": "Training file of the same task, for novelty metrics."}
    )
    predictions: str | None = field(
        default=None, metadata={"help": "Where to write the generated answers (JSONL; default: OUTPUT with .predictions.jsonl)."}
    )
    heads: str | None = field(
        default=None,
        metadata={"help": "Heads folder for the per-head intrinsic metrics (default: none, perplexity only)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch (prompts)."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Generation budget per answer (tokens; default: the task's)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Context length; longer prompts keep their last tokens (default: the model's)."},
    )
    num_samples: int = field(default=1, metadata={"help": "Answers per prompt, for pass@k (needs sampling)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N test rows (rows)."})
    chat_template: str = field(
        default="auto", metadata={"help": "'auto', 'model', 'plain' or a .jinja file, as in training."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: 'auto', 'float32', 'bfloat16' or 'float16'."}
    )
    intrinsic: bool = field(
        default=True, metadata={"help": "Also compute perplexity and per-head metrics on the gold answers."}
    )

    def __post_init__(self) -> None:
        get_task(self.task)  # an unknown task fails before anything loads
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs do_sample: greedy decoding returns the same completion each time")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _messages(task: Task, reference: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": task.prompt(reference)},
        {"role": "assistant", "content": task.target(reference)},
    ]


def generate_answers(
    model: Any,
    tokenizer: Any,
    chat_template: str,
    prompts: list[list[dict[str, str]]],
    sampling: Any,
    batch_size: int,
    seed: int,
    stop_token_ids: list[int],
    max_length: int,
    num_samples: int = 1,
) -> tuple[list[list[str]], dict[str, int]]:
    """Return `num_samples` answers per prompt (in prompt order) and counts of truncated prompts and
    answers cut at the budget."""
    from .data import encode_prompt, resolve_pad_token_id
    from .distill import HFGenerator

    generator = HFGenerator(model, resolve_pad_token_id(tokenizer), stop_token_ids, sampling)
    room = max_length - sampling.max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={sampling.max_new_tokens} leaves no room for the prompt in {max_length} tokens"
        )
    encoded = []
    truncated = 0
    for messages in prompts:
        ids = encode_prompt(tokenizer, messages, chat_template)
        if len(ids) > room:
            ids = ids[-room:]  # keep the end: the question's last part and the generation prompt
            truncated += 1
        encoded.append(ids)
    if truncated:
        logger.warning(
            "%d of %d prompts are longer than %d tokens (context %d minus max_new_tokens %d); they keep their "
            "last tokens",
            truncated,
            len(encoded),
            room,
            max_length,
            sampling.max_new_tokens,
        )

    jobs = [(index, sample) for index in range(len(encoded)) for sample in range(num_samples)]
    jobs.sort(key=lambda job: -len(encoded[job[0]]))  # longest prompts first, so that prompts of similar length share a batch
    answers: list[list[str]] = [[""] * num_samples for _ in encoded]
    cut = 0
    batches = range(0, len(jobs), batch_size)
    for number, start in enumerate(tqdm(batches, desc="Generating", unit="batch", leave=False)):
        batch = jobs[start : start + batch_size]
        completions = generator.generate([encoded[index] for index, _ in batch], seed=seed * 1_000_003 + number)
        for (index, sample), completion in zip(batch, completions):
            answers[index][sample] = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
            cut += completion.finish_reason == "length"
    return answers, {"prompts_truncated": truncated, "answers_cut_at_max_new_tokens": cut}


@torch.no_grad()
def intrinsic_metrics(
    caft_model: Any, tokenizer: Any, chat_template: str, conversations: list[list[dict[str, str]]],
    max_length: int, batch_size: int,
) -> dict[str, Any]:
    """Compute per-head loss, top-1 and top-5 accuracy and next-token perplexity on the gold answers.

    Losses are averaged over answer tokens (not over rows), so long answers weigh more, as in
    training. Head 1 is the model's own next-token head.
    """
    from .data import CAFTDataCollator, build_supervised_dataset, resolve_pad_token_id

    folder = tempfile.mkdtemp(prefix="caft-intrinsic-")
    path = Path(folder) / "gold.jsonl"
    try:
        write_jsonl([{"messages": messages} for messages in conversations], path)
        dataset, _ = build_supervised_dataset(path, tokenizer, max_length, chat_template=chat_template)
    finally:
        path.unlink(missing_ok=True)
        os.rmdir(folder)
    collator = CAFTDataCollator(pad_token_id=resolve_pad_token_id(tokenizer))
    caft_model.eval()
    mode = "caft" if len(caft_model.heads) else "ntp"
    num_heads = len(caft_model.heads) + 1
    sums = torch.zeros(3, num_heads, dtype=torch.float64)  # loss, top-1, top-5 summed over targets
    counts = torch.zeros(num_heads, dtype=torch.float64)
    for start in tqdm(range(0, len(dataset), batch_size), desc="Intrinsic", unit="batch", leave=False):
        batch = collator([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
        batch = {name: tensor.to(caft_model.device) for name, tensor in batch.items()}
        out = caft_model(**batch, mode=mode)
        number = out.head_num_targets.double().cpu()
        for row, values in enumerate((out.head_losses, out.head_accuracies, out.head_top5_accuracies)):
            sums[row] += torch.nan_to_num(values.double().cpu()) * number
        counts += number
    means = sums / counts.clamp(min=1)
    heads = [
        {
            "head": k + 1,
            "loss": means[0, k].item(),
            "top1": means[1, k].item(),
            "top5": means[2, k].item(),
            "targets": int(counts[k].item()),
        }
        for k in range(num_heads)
    ]
    return {"perplexity": math.exp(heads[0]["loss"]), "heads": heads}


def run_eval(options: EvalOptions) -> dict[str, Any]:
    """Generate, score and write the report; returns the written object."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .data import resolve_chat_template
    from .distill import SamplingSettings, find_stop_token_ids
    from .heads_io import resolve_heads_path
    from .pipeline import _check_model_source, _not_found_on_hub
    from .run_config import DTYPES
    from .scoring.run import result_json, score_completions

    task = get_task(options.task)
    for path in (options.output, options.predictions):
        if path and Path(path).is_dir():
            raise ValueError(f"output {path} is a folder; give a file name")
    references = load_references(task, options.data)
    if options.limit is not None:
        references = references[: options.limit]
    train_references = load_references(task, options.train_data) if options.train_data else None
    output = Path(options.output)
    predictions_path = Path(options.predictions) if options.predictions else output.with_suffix(".predictions.jsonl")

    _check_model_source(options.model)
    if options.heads:
        resolve_heads_path(options.heads)  # a wrong heads path fails now, not after generation
    try:
        tokenizer = AutoTokenizer.from_pretrained(options.model)
        model_config = AutoConfig.from_pretrained(options.model)
    except OSError as error:
        if Path(options.model).exists():
            raise
        raise _not_found_on_hub(options.model, error) from error
    chat_template = resolve_chat_template(tokenizer, options.chat_template)
    sampling = SamplingSettings(
        max_new_tokens=options.max_new_tokens or task.max_new_tokens,
        do_sample=options.do_sample,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
    )
    max_length = options.max_length or getattr(model_config, "max_position_embeddings", None)
    if max_length is None:
        raise ValueError("the model config has no max_position_embeddings; set --max-length")
    stop_token_ids = find_stop_token_ids(options.model, tokenizer, model_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        options.model, dtype="auto" if options.dtype == "auto" else DTYPES[options.dtype]
    ).to(device)
    model.generation_config = GenerationConfig()  # only the recorded settings apply (see caft distill)
    model.eval()

    logger.info("Answering %d %s prompts with %s", len(references), task.name, options.model)
    conversations = [_messages(task, reference) for reference in references]
    answers, generation_counts = generate_answers(
        model,
        tokenizer,
        chat_template,
        [messages[:1] for messages in conversations],
        sampling,
        options.batch_size,
        options.seed,
        stop_token_ids,
        max_length,
        options.num_samples,
    )
    prediction_rows = [
        {"id": reference["id"], **({"completion": texts[0]} if len(texts) == 1 else {"completions": texts})}
        for reference, texts in zip(references, answers)
    ]
    write_jsonl(prediction_rows, predictions_path)

    result = score_completions(task.name, references, answers, train_references)
    extra: dict[str, Any] = {
        "model": options.model,
        "data": options.data,
        "predictions": str(predictions_path),
        "settings": asdict(options),
        "generation": {**sampling.recorded(), **generation_counts},
    }
    if options.intrinsic:
        from .config import CAFTConfig
        from .heads_io import load_heads
        from .model import add_auxiliary_heads

        if options.heads:
            caft_model = load_heads(model, options.heads, allow_other_base=True)
        else:
            caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=0))
        extra["intrinsic"] = intrinsic_metrics(
            caft_model, tokenizer, chat_template, conversations, max_length, options.batch_size
        )
        result.metrics["perplexity"] = extra["intrinsic"]["perplexity"]
    report = result_json(task.name, result, extra)
    _write_json(output, report)
    logger.info("Scores: %s", ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items()))
    return report


def _write_json(path: Path, content: Any) -> None:
    """Write JSON through a temporary file and a rename, after rejecting a folder as the target."""
    from .run_outputs import write_json

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder. Give a file name, for example {path / 'scores.json'}")
    write_json(path, content)
