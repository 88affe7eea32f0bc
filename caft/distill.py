"""Self-distillation data: the base model's own answers to instruction prompts, for training heads.

Auxiliary heads trained with the trunk frozen learn to predict the tokens that follow the trunk's
hidden states. Training them on text that the base model writes itself, rather than on answers written
by people or by another model, shows them the continuations that the trunk actually produces.
`caft distill` writes such data, and `caft train-heads --data OUTPUT` reads it:

1. load prompt files of the shapes that `caft.data.load_prompts` reads, and draw a weighted mixture
   of prompts that depends only on the files, the weights, `num_prompts` and the seed;
2. answer each prompt turn by turn in batches (left padding, KV cache), with prompts rendered by the
   chat template exactly as training renders them (`caft.data.encode_prompt`);
3. append the conversations to a JSON Lines file after each batch, and keep a metadata file beside
   it, so that rerunning an interrupted command resumes without duplicate or lost rows.

Output rows (one JSON object a line)::

    {"conversation": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...],
     "prompt_id": "prompts.jsonl:3", "generated_tokens": [57], "finish_reasons": ["stop"],
     "unanswered_turns": 0}

`prompt_id` is the prompt file as given and the 0-based index of the row in it. `generated_tokens`
and `finish_reasons` ("stop" at an end-of-sequence token, "length" at max_new_tokens) have one entry
per answered turn. `unanswered_turns` counts the prompt's user turns left without an answer, because
the conversation no longer fit in max_length or an earlier answer was empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import torch

from .data import encode_prompt, load_prompts, resolve_chat_template, resolve_pad_token_id
from .run_config import DTYPES

try:
    import fcntl
except ImportError:  # Windows: outputs are not locked against a second writer.
    fcntl = None

logger = logging.getLogger(__name__)

METADATA_SUFFIX = ".meta.json"
METADATA_FORMAT = "caft-distill-1"
# Prompts skipped as too long are logged one by one up to this count, then only counted.
_LOGGED_SKIPS = 5


# ---------------------------------------------------------------------------------------------------
# Prompts and their weighted mixture
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSource:
    """A prompt file and its weight in the mixture, parsed from FILE or FILE:WEIGHT."""

    path: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> PromptSource:
        """Parse FILE[:WEIGHT]. A suffix after the last colon that is not a number stays part of the path."""
        path, colon, suffix = text.rpartition(":")
        if not colon or not path:
            return cls(text)
        try:
            weight = float(suffix)
        except ValueError:
            return cls(text)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"--prompts {text}: the weight must be a positive number, got {suffix!r}")
        return cls(path, weight)


@dataclass
class Prompt:
    """One prompt to answer.

    `turns` are the messages to add before each answer: the first holds any system messages and the
    first user message, and every later one holds the next user message (and system messages before
    it). `source` locates the row in messages, as caft.data names rows.
    """

    prompt_id: str
    source: str
    turns: list[list[dict[str, str]]]


@dataclass
class PromptFile:
    """The prompts of one file, with the file's weight and content hash (to detect a changed file)."""

    source: PromptSource
    prompts: list[Prompt]
    sha256: str


def load_prompt_files(sources: list[PromptSource]) -> list[PromptFile]:
    """Load every prompt file, dropping answers (see caft.data.load_prompts).

    Raises DataError for an unreadable, empty or invalid file, and ValueError for a file listed twice.
    """
    if not sources:
        raise ValueError("no prompt files given. Name one or more with --prompts FILE[:WEIGHT]")
    seen: dict[Path, str] = {}
    files = []
    for source in sources:
        resolved = Path(source.path).resolve()
        if resolved in seen:
            raise ValueError(
                f"--prompts lists {source.path} twice (also as {seen[resolved]}). List each file once, "
                "with its weight"
            )
        seen[resolved] = source.path

        conversations = load_prompts(source.path)
        prompts = [
            Prompt(f"{source.path}:{index}", conversation.source, _split_turns(conversation.messages))
            for index, conversation in enumerate(conversations)
        ]
        digest = hashlib.sha256(Path(source.path).read_bytes()).hexdigest()
        files.append(PromptFile(source, prompts, digest))
    return files


def _split_turns(messages: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Group system and user messages into turns, each ending with a user message."""
    turns: list[list[dict[str, str]]] = []
    pending: list[dict[str, str]] = []
    for message in messages:
        pending.append(message)
        if message["role"] == "user":
            turns.append(pending)
            pending = []
    # System messages after the last user message precede no answer, so they are left out.
    return turns


def select_prompts(files: list[PromptFile], num_prompts: int | None, seed: int) -> list[Prompt]:
    """Draw a weighted mixture of prompts, in an order that depends only on the inputs and `seed`.

    Without `num_prompts`, every prompt of every file is used once and the weights have no effect.
    With it, each file contributes num_prompts * weight / (sum of weights) prompts, rounded by largest
    remainder. A file with fewer prompts than its share contributes all of them, and the other files
    fill the rest in proportion to their weights. Prompts are drawn without repetition, and the whole
    selection is shuffled so that the first rows written already mix the files.

    Raises ValueError when `num_prompts` is not positive or exceeds the prompts in all files.
    """
    sizes = [len(prompt_file.prompts) for prompt_file in files]
    if num_prompts is None:
        shares = sizes
        if any(prompt_file.source.weight != 1.0 for prompt_file in files):
            logger.warning(
                "Prompt weights have no effect without --num-prompts, because every prompt is used once."
            )
    else:
        if num_prompts < 1:
            raise ValueError(f"--num-prompts must be a positive number of prompts, got {num_prompts}")
        if num_prompts > sum(sizes):
            raise ValueError(
                f"--num-prompts {num_prompts} is more than the {sum(sizes)} prompts in the prompt files. "
                "Lower it, or leave it unset to use every prompt once"
            )
        shares = _weighted_shares(sizes, [prompt_file.source.weight for prompt_file in files], num_prompts)
        for prompt_file, size, share in zip(files, sizes, shares):
            if share == size and num_prompts < sum(sizes):
                logger.info(
                    "All %d prompts of %s are used; other files fill the rest.", size, prompt_file.source.path
                )

    selected = []
    for file_index, (prompt_file, share) in enumerate(zip(files, shares)):
        order = _seeded_order(len(prompt_file.prompts), f"{seed}:file:{file_index}")
        selected.extend(prompt_file.prompts[index] for index in order[:share])
    mixed_order = _seeded_order(len(selected), f"{seed}:mixture")
    return [selected[index] for index in mixed_order]


def _weighted_shares(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """Split `total` between files in proportion to `weights`, capping each file at its size.

    Exact fractions keep the rounding identical on every machine.
    """
    shares = [0] * len(sizes)
    open_files = list(range(len(sizes)))
    remaining = total
    while remaining > 0:
        weight_sum = sum(Fraction(weights[index]) for index in open_files)
        exact = {index: remaining * Fraction(weights[index]) / weight_sum for index in open_files}
        full = [index for index in open_files if exact[index] >= sizes[index]]
        if full:
            # These files cannot give their share: take all of them and split the rest again.
            for index in full:
                shares[index] = sizes[index]
                remaining -= sizes[index]
            open_files = [index for index in open_files if index not in full]
            continue

        floors = {index: math.floor(exact[index]) for index in open_files}
        leftover = remaining - sum(floors.values())
        # Largest remainder first; ties go to the file listed first.
        by_remainder = sorted(open_files, key=lambda index: (-(exact[index] - floors[index]), index))
        for index in open_files:
            shares[index] = floors[index]
        for index in by_remainder[:leftover]:
            shares[index] += 1
        break
    return shares


def _seeded_order(count: int, seed: str) -> list[int]:
    """Return a permutation of range(count) determined by `seed`.

    It sorts by keys from Random.random(), whose sequence for a given seed Python keeps the same across
    versions, unlike the algorithms of Random.shuffle and Random.sample.
    """
    generator = random.Random(seed)
    keys = [generator.random() for _ in range(count)]
    return sorted(range(count), key=keys.__getitem__)


# ---------------------------------------------------------------------------------------------------
# Generation backends
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings: greedy unless `do_sample`. top_k 0 and top_p 1.0 turn those filters off."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(
                f"--max-new-tokens must be a positive number of tokens, got {self.max_new_tokens}"
            )
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be 0 (off) or a positive number of tokens, got {self.top_k}")

    def recorded(self) -> dict[str, Any]:
        """Return the settings that change the output, for the metadata. Greedy decoding ignores the rest."""
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


@dataclass
class Completion:
    """One generated answer: its token ids without the stop token or padding, and why it ended."""

    token_ids: list[int]
    finish_reason: str  # "stop" at a stop token, "length" at max_new_tokens


class AnswerGenerator(Protocol):
    """A backend that continues a batch of token id prompts."""

    name: str
    sampling: SamplingSettings

    def generate(self, prompts: list[list[int]], seed: int) -> list[Completion]:
        """Return one completion per prompt. The same prompts and seed give the same completions."""
        ...


class HFGenerator:
    """Generation with transformers' `model.generate`: left-padded batches and the KV cache."""

    name = "hf"

    def __init__(
        self, model: Any, pad_token_id: int, stop_token_ids: list[int], sampling: SamplingSettings
    ) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.sampling = sampling
        self.pad_token_id = pad_token_id
        self.stop_token_ids = list(stop_token_ids)
        options: dict[str, Any] = {}
        if sampling.do_sample:
            options = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
        self.generation_config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.do_sample,
            num_beams=1,
            use_cache=True,
            eos_token_id=self.stop_token_ids,
            pad_token_id=pad_token_id,
            **options,
        )

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        dtype: str,
        pad_token_id: int,
        stop_token_ids: list[int],
        sampling: SamplingSettings,
    ) -> HFGenerator:
        """Load the model in `dtype` ("auto" or a DTYPES name) on the GPU when there is one."""
        from transformers import AutoModelForCausalLM, GenerationConfig

        device = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info("Loading model %s (dtype %s) on %s", model_name, dtype, device)
        model = AutoModelForCausalLM.from_pretrained(
            model_name, dtype="auto" if dtype == "auto" else DTYPES[dtype]
        )
        # transformers 5 fills every option left unset in the config passed to generate() from
        # model.generation_config, so a repetition_penalty or min_p in the model's generation_config.json
        # would change the answers without being recorded. A blank config leaves only the recorded settings.
        model.generation_config = GenerationConfig()
        return cls(model.to(device).eval(), pad_token_id, stop_token_ids, sampling)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int) -> list[Completion]:
        device = self.model.device
        length = max(len(prompt) for prompt in prompts)
        # Left padding puts every prompt's last token in the last column, so each row's new tokens
        # start at column `length`. transformers derives position ids from the attention mask.
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)  # (batch, length)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)  # (batch, length)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, length - len(prompt) :] = 1

        # fork_rng restores the caller's random state afterwards, so seeding here changes nothing else.
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=self.generation_config,
            )  # (batch, length + generated); rows that stopped early are padded with pad_token_id
        return [self._completion(row[length:].tolist()) for row in output]

    def _completion(self, new_tokens: list[int]) -> Completion:
        for position, token_id in enumerate(new_tokens):
            if token_id in self.stop_token_ids:
                return Completion(new_tokens[:position], "stop")
        return Completion(new_tokens, "length")


class VLLMGenerator:
    """Generation with vLLM, for GPUs. Each row is sampled with its own seed derived from the batch's."""

    name = "vllm"

    # NOTE: untested here: vLLM needs CUDA and is not installed on the development machine, so this
    # class follows vLLM's documented LLM.generate API without a test run.
    def __init__(
        self,
        model_name: str,
        dtype: str,
        max_length: int,
        stop_token_ids: list[int],
        sampling: SamplingSettings,
    ) -> None:
        from vllm import LLM

        self.llm = LLM(model=model_name, dtype=dtype, max_model_len=max_length)
        self.stop_token_ids = list(stop_token_ids)
        self.sampling = sampling

    def generate(self, prompts: list[list[int]], seed: int) -> list[Completion]:
        from vllm import SamplingParams

        settings = self.sampling
        parameters = [
            SamplingParams(
                max_tokens=settings.max_new_tokens,
                # vLLM decodes greedily at temperature 0, and top_k -1 turns the top-k filter off.
                temperature=settings.temperature if settings.do_sample else 0.0,
                top_p=settings.top_p if settings.do_sample else 1.0,
                top_k=settings.top_k if settings.do_sample and settings.top_k > 0 else -1,
                seed=_derive_seed(seed, row),
                stop_token_ids=self.stop_token_ids,
            )
            for row in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": prompt} for prompt in prompts], parameters, use_tqdm=False
        )
        completions = []
        for output in outputs:
            token_ids = list(output.outputs[0].token_ids)
            if token_ids and token_ids[-1] in self.stop_token_ids:
                token_ids = token_ids[:-1]
            finish_reason = "length" if output.outputs[0].finish_reason == "length" else "stop"
            completions.append(Completion(token_ids, finish_reason))
        return completions


def resolve_backend(backend: str) -> str:
    """Return "hf" or "vllm" for --backend auto|hf|vllm. Auto takes vLLM when it is installed and CUDA is available."""
    import importlib.util

    vllm_installed = importlib.util.find_spec("vllm") is not None
    if backend == "auto":
        return "vllm" if vllm_installed and torch.cuda.is_available() else "hf"
    if backend == "vllm":
        if not vllm_installed:
            raise ValueError("--backend vllm: vllm is not installed. Install it, or use --backend hf")
        if not torch.cuda.is_available():
            raise ValueError("--backend vllm needs a CUDA GPU, and none is available. Use --backend hf")
    elif backend != "hf":
        raise ValueError(f"--backend must be auto, hf or vllm, got {backend!r}")
    return backend


def _derive_seed(*parts: Any) -> int:
    """Hash the parts into a 63-bit seed, so that every batch and turn has its own fixed random stream."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------------
# Answering prompts turn by turn
# ---------------------------------------------------------------------------------------------------


@dataclass
class AnsweredPrompt:
    """A prompt's conversation after generation, and the numbers stored with its row."""

    prompt: Prompt
    messages: list[dict[str, str]] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def answered_turns(self) -> int:
        return len(self.generated_tokens)

    def row(self) -> dict[str, Any]:
        return {
            "conversation": self.messages,
            "prompt_id": self.prompt.prompt_id,
            "generated_tokens": self.generated_tokens,
            "finish_reasons": self.finish_reasons,
            "unanswered_turns": len(self.prompt.turns) - self.answered_turns,
        }


def answer_prompts(
    prompts: list[Prompt],
    generator: AnswerGenerator,
    tokenizer: Any,
    chat_template: str,
    max_length: int,
    seed: int,
) -> tuple[list[AnsweredPrompt], int]:
    """Answer one batch of prompts turn by turn, and return the answers and the tokens generated.

    Turn t of every prompt that has one is generated in one batch, from the prompt rendered with all
    earlier turns and the model's own answers to them. A conversation ends early when its next prompt
    plus max_new_tokens would exceed `max_length`, or when an answer is empty after stripping
    whitespace, since training rejects empty assistant turns. Each turn is sampled with a seed derived
    from `seed` and the turn index.
    """
    max_new_tokens = generator.sampling.max_new_tokens
    states = [AnsweredPrompt(prompt) for prompt in prompts]
    tokens_generated = 0
    for turn in range(max(len(prompt.turns) for prompt in prompts)):
        requests = []  # (state, messages before the answer, prompt ids)
        for state in states:
            if state.stopped or turn >= len(state.prompt.turns):
                continue
            messages = state.messages + state.prompt.turns[turn]
            prompt_ids = encode_prompt(tokenizer, messages, chat_template)
            if len(prompt_ids) + max_new_tokens > max_length:
                state.stopped = True
                continue
            requests.append((state, messages, prompt_ids))
        if not requests:
            break

        completions = generator.generate(
            [prompt_ids for _, _, prompt_ids in requests], _derive_seed(seed, turn)
        )
        for (state, messages, _), completion in zip(requests, completions):
            tokens_generated += len(completion.token_ids)
            # Chat templates write their own separators around the content, so surrounding whitespace
            # (for example the space after the plain template's "Assistant:") is not part of the answer.
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
            if not text:
                state.stopped = True
                continue
            state.messages = messages + [{"role": "assistant", "content": text}]
            state.generated_tokens.append(len(completion.token_ids))
            state.finish_reasons.append(completion.finish_reason)
    return states, tokens_generated


# ---------------------------------------------------------------------------------------------------
# The output file, its metadata and resuming
# ---------------------------------------------------------------------------------------------------


def metadata_path(output: str | os.PathLike[str]) -> Path:
    """Return the metadata file of an output: OUTPUT.meta.json beside it."""
    return Path(os.fspath(output) + METADATA_SUFFIX)


def _check_output_path(output: Path) -> None:
    if not output.parent.is_dir():
        raise FileNotFoundError(
            f"output folder {output.parent} does not exist. Create it, or choose another --output"
        )
    if output.is_dir():
        raise ValueError(
            f"--output {output} is a folder. Give a file path, such as {output / 'distill.jsonl'}"
        )


def _check_earlier_run(output: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Return the earlier run's metadata when `output` has rows to resume, or None to start afresh.

    Raises ValueError when the output has no metadata or was written with other settings.
    """
    meta_path = metadata_path(output)
    if not output.is_file() or output.stat().st_size == 0:
        return None
    start_over = f"choose another --output, or delete {output} and {meta_path} to start over"
    if not meta_path.is_file():
        raise ValueError(
            f"{output} already exists, but its metadata file {meta_path} does not, so it cannot be resumed. "
            f"To keep it, {start_over}"
        )
    try:
        earlier = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{meta_path}: invalid metadata ({error}). To keep {output}, {start_over}"
        ) from error
    if not isinstance(earlier, dict) or earlier.get("format") != METADATA_FORMAT:
        raise ValueError(
            f"{meta_path} is not a caft distill metadata file (format {METADATA_FORMAT}). {start_over}"
        )

    differences = _setting_differences(earlier.get("settings", {}), settings)
    if differences:
        raise ValueError(
            f"{output} was written with other settings, so this run cannot resume it. Differences "
            f"(earlier run -> this run): {'; '.join(differences)}. Rerun with the earlier settings to resume, "
            f"or {start_over}"
        )
    return earlier


def _setting_differences(earlier: dict[str, Any], current: dict[str, Any]) -> list[str]:
    # A JSON round trip makes the current settings comparable with the ones read from the file.
    current = json.loads(json.dumps(current))
    differences = []
    for key in sorted(set(earlier) | set(current)):
        if earlier.get(key) != current.get(key):
            differences.append(f"{key}: {json.dumps(earlier.get(key))} -> {json.dumps(current.get(key))}")
    return differences


class _OutputFile:
    """The output JSON Lines file, open for appending (see `_open_output`)."""

    def __init__(self, path: Path, stream: Any) -> None:
        self.path = path
        self.stream = stream

    def read_rows(self) -> dict[str, dict[str, Any]]:
        """Return the rows already written by prompt_id, after removing a partial last line.

        Rows are written as whole lines, so text after the last newline can only be the start of a
        row whose write was interrupted. Its batch is generated again and the row written in full.
        """
        self.stream.seek(0)
        data = self.stream.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            logger.warning(
                "%s: removing an incomplete last row (%d bytes) left by an interrupted run.",
                self.path,
                len(data) - end,
            )
            self.stream.truncate(end)
            self._sync()

        rows: dict[str, dict[str, Any]] = {}
        for line_number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(
                    f"{self.path}:{line_number}: invalid row ({error}). The file was changed after caft distill "
                    "wrote it. Remove the line to resume, or choose another --output"
                ) from error
            prompt_id = row.get("prompt_id") if isinstance(row, dict) else None
            if not isinstance(prompt_id, str) or "conversation" not in row:
                raise ValueError(
                    f"{self.path}:{line_number}: the row has no 'prompt_id' or 'conversation', so caft distill "
                    "did not write it. Remove the line to resume, or choose another --output"
                )
            if prompt_id in rows:
                raise ValueError(
                    f"{self.path}:{line_number}: a second row for prompt {prompt_id}. Remove one of them to resume"
                )
            rows[prompt_id] = row
        return rows

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append rows as one write, then flush and fsync so that a crash keeps every row written so far."""
        data = b"".join(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n" for row in rows)
        self.stream.write(data)
        self._sync()

    def _sync(self) -> None:
        self.stream.flush()
        os.fsync(self.stream.fileno())


@contextlib.contextmanager
def _open_output(path: Path) -> Iterator[_OutputFile]:
    """Open the output for appending, locked so that a second writer fails instead of mixing rows."""
    with open(path, "a+b") as stream:
        if fcntl is not None:
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise ValueError(
                    f"{path} is being written by another process, such as a second caft distill. "
                    "Wait for it to finish, or choose another --output"
                ) from error
        # Closing the file releases the lock.
        yield _OutputFile(path, stream)


@dataclass
class _RowCounts:
    """Totals over the rows in the output file."""

    rows_written: int = 0
    turns_answered: int = 0
    turns_unanswered: int = 0
    generated_tokens: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows_written += 1
        self.turns_answered += len(row.get("generated_tokens", []))
        self.turns_unanswered += int(row.get("unanswered_turns", 0))
        self.generated_tokens += sum(row.get("generated_tokens", []))


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


@dataclass
class DistillOptions:
    """Settings of a `caft distill` run. The CLI flags of the same names document them."""

    model: str
    prompts: list[PromptSource | str]
    output: str | os.PathLike[str]
    num_prompts: int | None = None
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8
    max_length: int | None = None
    chat_template: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.prompts = [
            source if isinstance(source, PromptSource) else PromptSource.parse(source)
            for source in self.prompts
        ]
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive number of prompts, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be 'auto' or one of {list(DTYPES)}, got {self.dtype!r}")

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.max_new_tokens, self.do_sample, self.temperature, self.top_p, self.top_k)


@dataclass
class DistillResult:
    """Outcome of a run: the output paths, the counts stored in the metadata, and this run's speed."""

    output: Path
    metadata_path: Path
    counts: dict[str, int]
    rows_added: int
    # Tokens generated by this run, including answers generated again after an interruption and
    # empty answers that were dropped.
    tokens_this_run: int
    # Seconds spent generating in this run, after loading the model.
    seconds: float

    def summary(self) -> str:
        """Describe the run in one paragraph."""
        counts = self.counts
        speed = self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0
        return (
            f"Wrote {self.rows_added} new rows to {self.output}, which now has {counts['rows_written']} rows. "
            f"Of {counts['prompts_selected']} selected prompts, {counts['prompts_skipped_too_long']} were skipped "
            f"as longer than the context and {counts['prompts_dropped_empty_answer']} were dropped for an empty "
            f"first answer; {counts['turns_unanswered']} later turns were left unanswered. The rows contain "
            f"{counts['generated_tokens']} generated tokens; this run generated {self.tokens_this_run} tokens in "
            f"{self.seconds:.1f} s ({speed:.1f} tokens/s). Metadata: {self.metadata_path}."
        )


def run_distill(options: DistillOptions, generator: AnswerGenerator | None = None) -> DistillResult:
    """Answer the selected prompts with the base model and append the conversations to the output.

    Rerunning with the same options resumes an interrupted run. Batches are fixed slices of the
    selected prompts, and each batch is sampled with a seed derived from `seed` and the batch index.
    A batch generated again therefore reproduces the rows of an uninterrupted run, and only its missing
    rows are written. `generator` replaces the backend that `options.backend` selects, so no model is
    loaded; its sampling settings must equal the options'.

    Raises ValueError or FileNotFoundError (DataError for prompt files) for invalid options, prompt
    files, models and outputs, and for an output written with other settings.
    """
    sampling = options.sampling()
    if generator is not None and generator.sampling != sampling:
        raise ValueError(
            f"the generator's settings {generator.sampling} differ from the options' {sampling}, "
            "which the metadata records. Build the generator from options.sampling()"
        )
    output = Path(options.output)
    _check_output_path(output)

    files = load_prompt_files(options.prompts)  # type: ignore[arg-type]  # parsed in __post_init__
    tokenizer, model_config = _load_tokenizer_and_config(options.model)
    stop_token_ids = find_stop_token_ids(options.model, tokenizer, model_config)
    chat_template = resolve_chat_template(tokenizer, options.chat_template)
    max_length = _resolve_max_length(options.max_length, model_config, sampling.max_new_tokens)
    backend = generator.name if generator is not None else resolve_backend(options.backend)

    selected = select_prompts(files, options.num_prompts, options.seed)
    kept, skipped = _skip_long_prompts(
        selected, tokenizer, chat_template, max_length, sampling.max_new_tokens
    )

    settings = {
        "model": options.model,
        "backend": backend,
        "dtype": options.dtype,
        "chat_template": os.fspath(options.chat_template),
        "chat_template_sha256": hashlib.sha256(chat_template.encode("utf-8")).hexdigest(),
        "prompts": [
            {"path": file.source.path, "weight": file.source.weight, "sha256": file.sha256} for file in files
        ],
        "num_prompts": options.num_prompts,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "max_length": max_length,
        **sampling.recorded(),
    }
    earlier = _check_earlier_run(output, settings)
    dropped = list(earlier.get("dropped_empty_answer", [])) if earlier else []
    record = _RunRecord(settings, files, selected, skipped, dropped)

    with _open_output(output) as output_file:
        written = output_file.read_rows()
        _check_rows_selected(output, written, kept)
        for row in written.values():
            record.counts.add(row)
        _write_metadata(output, record.metadata(complete=False))

        done = set(written) | set(record.dropped)
        remaining = sum(prompt.prompt_id not in done for prompt in kept)
        if remaining < len(kept):
            logger.info("Resuming %s: %d of %d prompts are done.", output, len(kept) - remaining, len(kept))
        if remaining and generator is None:
            generator = _load_generator(backend, options, sampling, tokenizer, stop_token_ids, max_length)

        started = time.perf_counter()  # after loading, so that the speeds measure generation only
        rows_added, tokens_this_run = _answer_missing_prompts(
            kept,
            options.batch_size,
            options.seed,
            done,
            record,
            output_file,
            generator,  # type: ignore[arg-type]  # loaded above whenever a prompt remains
            tokenizer,
            chat_template,
            max_length,
        )
        seconds = time.perf_counter() - started
        final = record.metadata(complete=True)
        _write_metadata(output, final)

    if record.dropped:
        logger.warning(
            "%d prompts were dropped because the model's first answer was empty (listed in %s).",
            len(record.dropped),
            metadata_path(output),
        )
    return DistillResult(
        output=output,
        metadata_path=metadata_path(output),
        counts=final["counts"],
        rows_added=rows_added,
        tokens_this_run=tokens_this_run,
        seconds=seconds,
    )


@dataclass
class _RunRecord:
    """Content of the metadata file: the settings, the prompt selection and the counts so far."""

    settings: dict[str, Any]
    files: list[PromptFile]
    selected: list[Prompt]
    skipped: list[str]
    # Prompts whose first answer was empty. Resuming reads them back, because they have no row.
    dropped: list[str]
    counts: _RowCounts = field(default_factory=_RowCounts)

    def metadata(self, complete: bool) -> dict[str, Any]:
        selected_per_file: dict[str, int] = {}
        for prompt in self.selected:
            path = prompt.prompt_id.rpartition(":")[0]
            selected_per_file[path] = selected_per_file.get(path, 0) + 1
        return {
            "format": METADATA_FORMAT,
            "settings": self.settings,
            "prompt_files": [
                {
                    "path": file.source.path,
                    "weight": file.source.weight,
                    "prompts_in_file": len(file.prompts),
                    "prompts_selected": selected_per_file.get(file.source.path, 0),
                }
                for file in self.files
            ],
            "counts": {
                "prompts_selected": len(self.selected),
                "prompts_skipped_too_long": len(self.skipped),
                "prompts_dropped_empty_answer": len(self.dropped),
                "rows_written": self.counts.rows_written,
                "turns_answered": self.counts.turns_answered,
                "turns_unanswered": self.counts.turns_unanswered,
                "generated_tokens": self.counts.generated_tokens,
            },
            "skipped_too_long": self.skipped,
            "dropped_empty_answer": self.dropped,
            "complete": complete,
        }


def _answer_missing_prompts(
    prompts: list[Prompt],
    batch_size: int,
    seed: int,
    done: set[str],
    record: _RunRecord,
    output_file: _OutputFile,
    generator: AnswerGenerator,
    tokenizer: Any,
    chat_template: str,
    max_length: int,
) -> tuple[int, int]:
    """Generate every batch that has a prompt not in `done`, and append its missing rows.

    Updates `done` and `record`, and rewrites the metadata after each batch. Returns the rows added
    and the tokens generated.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    rows_added = 0
    tokens_generated = 0
    started = time.perf_counter()
    initial = sum(prompt.prompt_id in done for prompt in prompts)
    with (
        logging_redirect_tqdm(),
        tqdm(total=len(prompts), initial=initial, unit="prompts", desc="caft distill") as progress,
    ):
        for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
            batch = prompts[start : start + batch_size]
            missing = [prompt for prompt in batch if prompt.prompt_id not in done]
            if not missing:
                continue
            # A batch that was partly written before an interruption is generated again in full,
            # because its rows depend on every prompt in it (padding, and the shared random stream).
            batch_seed = _derive_seed(seed, "batch", batch_index)
            answers, tokens = answer_prompts(
                batch, generator, tokenizer, chat_template, max_length, batch_seed
            )
            tokens_generated += tokens

            new_rows = []
            for answer in answers:
                prompt_id = answer.prompt.prompt_id
                if prompt_id in done:
                    continue
                done.add(prompt_id)
                if answer.answered_turns == 0:
                    logger.debug(
                        "%s: the first answer is empty, so the prompt is dropped.", answer.prompt.source
                    )
                    record.dropped.append(prompt_id)
                    continue
                row = answer.row()
                new_rows.append(row)
                record.counts.add(row)
            output_file.append(new_rows)
            rows_added += len(new_rows)
            _write_metadata(output_file.path, record.metadata(complete=False))

            elapsed = time.perf_counter() - started
            progress.set_postfix_str(f"{tokens_generated / elapsed:.0f} tokens/s", refresh=False)
            progress.update(len(missing))
    return rows_added, tokens_generated


def _load_tokenizer_and_config(model_name: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name), AutoConfig.from_pretrained(model_name)
    except OSError as error:
        if Path(model_name).exists():
            raise
        offline = (
            " HF_HUB_OFFLINE is set, so only models in the local cache load."
            if os.environ.get("HF_HUB_OFFLINE")
            else ""
        )
        raise FileNotFoundError(
            f"--model {model_name}: not a local folder, and it could not be loaded from the Hugging Face Hub."
            f"{offline} ({error})"
        ) from error


def find_stop_token_ids(model_name: str, tokenizer: Any, model_config: Any) -> list[int]:
    """Collect the end-of-sequence ids of the tokenizer, config.json and generation_config.json.

    Chat models often list their end-of-turn tokens in generation_config.json, so all of them stop an
    answer. Raises ValueError when there is none, because generation could then only stop at
    max_new_tokens and no answer would end the way training teaches.
    """
    from transformers import GenerationConfig

    candidates = [getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)]
    try:
        candidates.append(GenerationConfig.from_pretrained(model_name).eos_token_id)
    except OSError:
        pass  # the model has no generation_config.json
    stop_token_ids: list[int] = []
    for candidate in candidates:
        for token_id in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if token_id is not None and int(token_id) not in stop_token_ids:
                stop_token_ids.append(int(token_id))
    if not stop_token_ids:
        raise ValueError(
            f"--model {model_name} has no end-of-sequence token: neither its tokenizer (eos_token) nor "
            "config.json or generation_config.json (eos_token_id) names one, so generation could not stop "
            "before --max-new-tokens. Set eos_token_id in the model's generation_config.json"
        )
    return stop_token_ids


def _resolve_max_length(requested: int | None, model_config: Any, max_new_tokens: int) -> int:
    model_limit = getattr(model_config, "max_position_embeddings", None)
    if requested is None:
        if model_limit is None:
            raise ValueError(
                "the model config has no max_position_embeddings, so its context length is unknown. Set --max-length"
            )
        max_length = int(model_limit)
    else:
        max_length = requested
        if model_limit is not None and requested > model_limit:
            logger.warning(
                "--max-length %d exceeds the model's max_position_embeddings (%d), so late tokens of long "
                "conversations fall outside the positions the model was trained on.",
                requested,
                model_limit,
            )
    if max_new_tokens >= max_length:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the context of {max_length} tokens "
            "(--max-length). Lower --max-new-tokens"
        )
    return max_length


def _skip_long_prompts(
    prompts: list[Prompt], tokenizer: Any, chat_template: str, max_length: int, max_new_tokens: int
) -> tuple[list[Prompt], list[str]]:
    """Split off prompts whose first turn plus max_new_tokens exceeds max_length. Return (kept, skipped ids)."""
    kept, skipped = [], []
    for prompt in prompts:
        length = len(encode_prompt(tokenizer, prompt.turns[0], chat_template))
        if length + max_new_tokens <= max_length:
            kept.append(prompt)
            continue
        skipped.append(prompt.prompt_id)
        if len(skipped) <= _LOGGED_SKIPS:
            logger.warning(
                "%s: skipped, because its %d prompt tokens plus --max-new-tokens %d exceed the context of %d "
                "tokens (--max-length).",
                prompt.source,
                length,
                max_new_tokens,
                max_length,
            )
    if len(skipped) > _LOGGED_SKIPS:
        logger.warning(
            "%d more prompts skipped for the same reason, %d in all.",
            len(skipped) - _LOGGED_SKIPS,
            len(skipped),
        )
    if not kept:
        raise ValueError(
            f"all {len(prompts)} selected prompts are too long: each one's tokens plus --max-new-tokens "
            f"{max_new_tokens} exceed the context of {max_length} tokens (--max-length). Lower --max-new-tokens, "
            "raise --max-length up to the model's context, or use shorter prompts"
        )
    return kept, skipped


def _check_rows_selected(output: Path, written: dict[str, dict[str, Any]], kept: list[Prompt]) -> None:
    kept_ids = {prompt.prompt_id for prompt in kept}
    unknown = [prompt_id for prompt_id in written if prompt_id not in kept_ids]
    if unknown:
        raise ValueError(
            f"{output} has {len(unknown)} rows for prompts that this run does not answer (for example "
            f"{unknown[0]}), so other commands wrote to it. Choose another --output"
        )


def _load_generator(
    backend: str,
    options: DistillOptions,
    sampling: SamplingSettings,
    tokenizer: Any,
    stop_token_ids: list[int],
    max_length: int,
) -> AnswerGenerator:
    if backend == "vllm":
        return VLLMGenerator(options.model, options.dtype, max_length, stop_token_ids, sampling)
    pad_token_id = resolve_pad_token_id(tokenizer)
    return HFGenerator.from_pretrained(options.model, options.dtype, pad_token_id, stop_token_ids, sampling)


def _write_metadata(output: Path, content: dict[str, Any]) -> None:
    # Imported here because caft.run_outputs loads transformers, which `caft --help` does not need.
    from .run_outputs import write_json

    write_json(metadata_path(output), content)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def add_distill_command(commands: Any) -> None:
    """Add the `distill` subcommand to the `caft` subparsers `commands`."""
    import argparse

    parser = commands.add_parser(
        "distill",
        help="Answer instruction prompts with the base model and save the conversations for head training.",
        description="Generate self-distillation data: the base model answers a weighted mixture of prompts, "
        "turn by turn, and the conversations are appended to a JSON Lines file for "
        "`caft train-heads --data OUTPUT`. Rerunning the same command resumes an interrupted run.",
    )
    parser.add_argument("--model", required=True, help="Base model: a local folder or a Hugging Face Hub id.")
    parser.add_argument(
        "--prompts",
        required=True,
        nargs="+",
        metavar="FILE[:WEIGHT]",
        help="Prompt files (JSON or JSON Lines): conversation, messages, Alpaca, prompt/completion, MT-bench "
        "or self-instruct rows. Answers in them are ignored. WEIGHT sets the file's share of --num-prompts. "
        "Default weight: 1.",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        metavar="N",
        help="Total number of prompts drawn from the mixture, without repetition. Default: every prompt once.",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="Output JSON Lines file of conversations. Its metadata goes to OUTPUT.meta.json. The folder must exist.",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="Maximum tokens generated per answer (per turn). Default: 256.",
    )
    parser.add_argument(
        "--do-sample",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Sample the answers instead of greedy decoding. Default: greedy (--no-do-sample).",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="Sampling temperature, with --do-sample. Default: 1.0."
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="Nucleus sampling with --do-sample: keep the most likely tokens up to this total probability. "
        "Default: 1.0 (off).",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="With --do-sample, keep only this many most likely tokens. Default: 0 (off).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the prompt selection and of sampling. Default: 0."
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="Prompts generated together and written together. vLLM schedules one batch at a time, so give it "
        "a large value with --backend vllm. Default: 8.",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="Context limit in tokens, prompt plus answer: prompts whose tokens plus --max-new-tokens exceed it "
        "are skipped and counted. Default: the model's max_position_embeddings.",
    )
    parser.add_argument(
        "--chat-template",
        default="auto",
        help="'auto' (the tokenizer's template, else 'plain'), 'model', 'plain' (User:/Assistant: lines), "
        "or a .jinja file. Use the same value as for training. Default: auto.",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="Weights dtype. Default: auto (as saved).",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "hf", "vllm"],
        help="Generation backend: 'hf' (transformers generate) or 'vllm'. Default: auto, which uses vLLM when it "
        "is installed and CUDA is available, else hf.",
    )
    parser.set_defaults(handler=command_distill)


def command_distill(args: Any) -> int:
    """Run `caft distill` from parsed arguments and print the summary."""
    options = DistillOptions(
        model=args.model,
        prompts=[PromptSource.parse(text) for text in args.prompts],
        output=args.output,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat_template=args.chat_template,
        dtype=args.dtype,
        backend=args.backend,
    )
    result = run_distill(options)
    print(result.summary())
    return 0
