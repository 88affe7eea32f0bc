"""Training data for fine-tuning: JSON/JSONL rows to token ids with labels on assistant tokens only.

Fine-tuning a chat model should train only the text the model is expected to produce: the assistant
turns, including each turn's end-of-turn token so that the model learns to stop. This module

1. reads rows of several common shapes from JSON or JSON Lines files into normalised conversations,
2. renders each conversation with a chat template (the tokenizer's own one, or a plain fallback for
   base models that have none),
3. finds each assistant turn in the rendered text by rendering growing prefixes of the conversation,
   so the masks follow the template's own token boundaries and never depend on searching for the
   answer text or on a hard-coded end token,
4. tokenizes once, labels the tokens inside assistant turns, truncates and counts what was lost,
5. pads batches with `CAFTDataCollator`.

Every problem with an input file raises `DataError`, whose message names the file, the row and the fix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

# The label value that torch.nn.functional.cross_entropy ignores by default (its ignore_index).
IGNORE_INDEX = -100


class DataError(ValueError):
    """Invalid training data, chat template or tokenizer. The message names the input and the fix."""


# ---------------------------------------------------------------------------------------------------
# Reading rows into conversations
# ---------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """One training row as chat messages.

    `messages` are dicts with exactly the keys "role" (one of "system", "user", "assistant") and
    "content" (a string). `source` locates the row for error messages: "train.jsonl:17" for line 17
    (1-based) of a JSON Lines file, "data.json row 3 (0-based)" for an element of a JSON array.
    """

    messages: list[dict[str, str]]
    source: str


# Role names accepted in each message-list shape, mapped to the normalised role.
_CONVERSATION_ROLES = {"human": "user", "user": "user", "assistant": "assistant", "system": "system"}
_MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}

# Listed in the error for a row of no known shape.
_ACCEPTED_SHAPES = (
    '{"conversation": [{"role": "human"|"user"|"assistant"|"system", "content": ...}, ...]}, '
    '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}, '
    '{"instruction": ..., "input": ... (optional), "output": ...}, '
    '{"prompt": ..., "completion": ...} (two strings, or two lists of messages), '
    "or any two string fields named with prompt_field and completion_field"
)


def load_conversations(
    path: str | os.PathLike[str],
    prompt_field: str | None = None,
    completion_field: str | None = None,
    max_rows: int | None = None,
) -> list[Conversation]:
    """Read a JSON array or JSON Lines file into conversations, validating every row.

    The format is chosen by content: a file whose first non-blank character is "[" is one JSON array
    of rows, and any other file is JSON Lines (one object per line, blank lines skipped). Accepted rows:

    - {"conversation": [{"role", "content"}, ...]} with roles "human" (read as "user"), "user",
      "assistant" and "system";
    - {"messages": [{"role", "content"}, ...]} with roles "system", "user" and "assistant";
    - Alpaca {"instruction", "input", "output"}: the user turn is the instruction, followed by a blank
      line and the input when the input is present and not blank;
    - {"prompt", "completion"}: two strings, or TRL's conversational form with two message lists.

    When `prompt_field` and `completion_field` are given, every row is read instead as one user turn
    from `row[prompt_field]` and one assistant turn from `row[completion_field]`, for example
    "question" and "answer" in GSM8K. `max_rows` stops reading after that many rows.

    Raises DataError for a missing or empty file, invalid JSON, and any row that does not validate.
    """
    if (prompt_field is None) != (completion_field is None):
        raise DataError(
            f"prompt_field={prompt_field!r} and completion_field={completion_field!r}: "
            "set both to read two fields of each row, or neither"
        )
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be a positive number of rows or None, got {max_rows!r}")

    conversations = []
    for source, row in _read_rows(Path(path), max_rows):
        messages = _row_to_messages(row, source, prompt_field, completion_field)
        _check_messages(messages, source)
        conversations.append(Conversation(messages=messages, source=source))

    if not conversations:
        raise DataError(
            f"{path}: the file contains no rows. Write one JSON object per line, or a JSON array of objects"
        )
    return conversations


def _read_rows(path: Path, max_rows: int | None) -> list[tuple[str, Any]]:
    """Parse the file into (source, row) pairs, before any check of the rows themselves."""
    if not path.is_file():
        raise DataError(f"{path}: file not found. Check the path to the training data")
    try:
        # utf-8-sig also accepts files that start with a byte order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: the file is not valid UTF-8 ({error}). Save it as UTF-8") from error

    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{error.lineno}: invalid JSON at column {error.colno}: {error.msg}. "
                "The file starts with '[', so it is read as one JSON array of rows. Fix the JSON"
            ) from error
        if max_rows is not None:
            rows = rows[:max_rows]
        return [(f"{path} row {index} (0-based)", row) for index, row in enumerate(rows)]

    rows_with_sources = []
    # Split at "\n" only: str.splitlines() also splits at U+2028 and other characters that JSON
    # strings may contain unescaped (GSM8K's training file has one).
    for line_number, line in enumerate(text.split("\n"), start=1):
        if max_rows is not None and len(rows_with_sources) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{line_number}: invalid JSON at column {error.colno}: {error.msg}. "
                "The file does not start with '[', so it is read as JSON Lines, one complete JSON object "
                "per line. Fix or remove this line"
            ) from error
        rows_with_sources.append((f"{path}:{line_number}", row))
    return rows_with_sources


def _row_to_messages(
    row: Any, source: str, prompt_field: str | None, completion_field: str | None
) -> list[dict[str, str]]:
    """Convert one row of any accepted shape to normalised messages."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object as the row, got {type(row).__name__}")

    if prompt_field is not None and completion_field is not None:
        prompt = _string_field(row, prompt_field, source)
        completion = _string_field(row, completion_field, source)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]

    if "conversation" in row:
        return _message_list(row["conversation"], "conversation", _CONVERSATION_ROLES, source)
    if "messages" in row:
        return _message_list(row["messages"], "messages", _MESSAGES_ROLES, source)
    if "instruction" in row and "output" in row:
        return _alpaca_messages(row, source)
    if "prompt" in row and "completion" in row:
        return _prompt_completion_messages(row, source)

    raise DataError(
        f"{source}: the row matches no accepted shape (its fields: {', '.join(sorted(row)) or 'none'}). "
        f"Accepted shapes: {_ACCEPTED_SHAPES}"
    )


def _string_field(row: dict[str, Any], name: str, source: str) -> str:
    if name not in row:
        raise DataError(
            f"{source}: the row has no field {name!r} (its fields: {', '.join(sorted(row))}). "
            "Check prompt_field and completion_field"
        )
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{source}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _message_list(
    messages: Any, field_name: str, accepted_roles: Mapping[str, str], source: str
) -> list[dict[str, str]]:
    """Validate a list of {"role", "content"} dicts and map its roles to system/user/assistant."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: field {field_name!r} must be a non-empty list of messages")

    normalised = []
    for index, message in enumerate(messages):
        where = f"{source}: {field_name}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f'{where} must be an object with "role" and "content" fields, got {message!r}')
        role = message["role"]
        if role not in accepted_roles:
            raise DataError(
                f"{where} has unknown role {role!r}. Accepted roles in {field_name!r}: "
                f"{', '.join(repr(name) for name in accepted_roles)}"
            )
        content = message["content"]
        if not isinstance(content, str):
            raise DataError(f"{where} content must be a string, got {type(content).__name__}")
        normalised.append({"role": accepted_roles[role], "content": content})
    return normalised


def _alpaca_messages(row: dict[str, Any], source: str) -> list[dict[str, str]]:
    """Convert an Alpaca row. The user turn is the instruction, then a blank line and the input if any."""
    instruction = _string_field(row, "instruction", source)
    output = _string_field(row, "output", source)
    user_content = _instruction_with_input(instruction, row.get("input"), source)
    return [{"role": "user", "content": user_content}, {"role": "assistant", "content": output}]


def _instruction_with_input(instruction: str, extra_input: Any, source: str) -> str:
    """Join an instruction and its optional input into one user turn, separated by a blank line."""
    extra_input = extra_input or ""
    if not isinstance(extra_input, str):
        raise DataError(f"{source}: field 'input' must be a string, got {type(extra_input).__name__}")
    return instruction + "\n\n" + extra_input if extra_input.strip() else instruction


def _prompt_completion_messages(row: dict[str, Any], source: str) -> list[dict[str, str]]:
    """Convert a prompt/completion row: two strings, or TRL's conversational form with two message lists."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]

    if isinstance(prompt, list) and isinstance(completion, list):
        prompt_messages = _message_list(prompt, "prompt", _MESSAGES_ROLES, source)
        completion_messages = _message_list(completion, "completion", _MESSAGES_ROLES, source)
        # Every assistant message is trained, so an assistant message in the prompt would be trained
        # too, unlike in TRL where only the completion is. Rejecting it keeps the two consistent.
        if any(message["role"] == "assistant" for message in prompt_messages):
            raise DataError(
                f"{source}: 'prompt' contains an assistant message, which would be trained as well. "
                "Move the whole conversation into a 'messages' field to train every assistant turn"
            )
        if any(message["role"] != "assistant" for message in completion_messages):
            raise DataError(f"{source}: every message in 'completion' must have the role 'assistant'")
        return prompt_messages + completion_messages

    raise DataError(
        f"{source}: 'prompt' and 'completion' must both be strings or both be lists of messages, "
        f"got {type(prompt).__name__} and {type(completion).__name__}"
    )


def _check_messages(messages: list[dict[str, str]], source: str) -> None:
    """Reject conversations with nothing to train: no assistant turn, or a blank one."""
    assistant_turns = [message for message in messages if message["role"] == "assistant"]
    if not assistant_turns:
        raise DataError(f"{source}: the conversation has no assistant turn, so there is nothing to train on")
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(
                f"{source}: message {index} (0-based) is an empty assistant turn. "
                "Remove the row or give the turn its text"
            )


# ---------------------------------------------------------------------------------------------------
# Reading rows as prompts, for generating answers
# ---------------------------------------------------------------------------------------------------

# Listed in the error for a prompt row of no known shape.
_ACCEPTED_PROMPT_SHAPES = (
    '{"conversation": [...]} or {"messages": [...]} (assistant messages are dropped), '
    '{"instruction": ..., "input": ... (optional), "output": ... (optional)}, '
    '{"prompt": ..., "completion": ... (optional)}, MT-bench {"turns": [...]}, '
    'or self-instruct {"instruction": ..., "instances": [{"input": ..., "output": ...}, ...]}'
)


def load_prompts(path: str | os.PathLike[str], max_rows: int | None = None) -> list[Conversation]:
    """Read a JSON array or JSON Lines file of prompts: the system and user messages of each row.

    Rows may have any shape that load_conversations accepts, with the answers optional and dropped
    (assistant messages, Alpaca "output", "completion"), or one of two prompt-only shapes:

    - MT-bench {"turns": [text, ...]}: one user message per turn;
    - self-instruct seed tasks {"instruction", "instances": [{"input", "output"}, ...]}: one user
      message joined from the instruction and the first instance's input, as for an Alpaca row.

    Every user message is a turn to answer, so a conversation that had answers gets a new answer after
    each of its user messages. `max_rows` stops reading after that many rows. Raises DataError for a
    missing or empty file, invalid JSON, a row of no known shape and a row without a user message.
    """
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be a positive number of rows or None, got {max_rows!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found. Check the path")

    prompts = []
    for source, row in _read_rows(path, max_rows):
        messages = _row_to_prompt_messages(row, source)
        if not any(message["role"] == "user" for message in messages):
            raise DataError(f"{source}: the row has no user message, so there is no prompt to answer")
        prompts.append(Conversation(messages=messages, source=source))

    if not prompts:
        raise DataError(
            f"{path}: the file contains no prompts. Write one JSON object per line, or a JSON array of objects"
        )
    return prompts


def _row_to_prompt_messages(row: Any, source: str) -> list[dict[str, str]]:
    """Convert one prompt row of any accepted shape to its system and user messages."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object as the row, got {type(row).__name__}")

    if "conversation" in row:
        messages = _message_list(row["conversation"], "conversation", _CONVERSATION_ROLES, source)
    elif "messages" in row:
        messages = _message_list(row["messages"], "messages", _MESSAGES_ROLES, source)
    elif "turns" in row:
        messages = _mt_bench_messages(row["turns"], source)
    elif "instruction" in row and "instances" in row:
        messages = _self_instruct_messages(row, source)
    elif "instruction" in row:
        instruction = _string_field(row, "instruction", source)
        messages = [
            {"role": "user", "content": _instruction_with_input(instruction, row.get("input"), source)}
        ]
    elif "prompt" in row:
        messages = _prompt_messages(row["prompt"], source)
    else:
        raise DataError(
            f"{source}: the row matches no accepted prompt shape (its fields: "
            f"{', '.join(sorted(row)) or 'none'}). Accepted shapes: {_ACCEPTED_PROMPT_SHAPES}"
        )
    return [message for message in messages if message["role"] != "assistant"]


def _mt_bench_messages(turns: Any, source: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise DataError(f"{source}: field 'turns' must be a non-empty list of strings (the user turns)")
    return [{"role": "user", "content": turn} for turn in turns]


def _self_instruct_messages(row: dict[str, Any], source: str) -> list[dict[str, str]]:
    """Convert a self-instruct seed task. Only the first instance's input is used, as Alpaca's input."""
    instruction = _string_field(row, "instruction", source)
    instances = row["instances"]
    if not isinstance(instances, list):
        raise DataError(f"{source}: field 'instances' must be a list, got {type(instances).__name__}")
    extra_input = None
    if instances:
        if not isinstance(instances[0], dict):
            raise DataError(
                f"{source}: instances[0] must be an object with an 'input' field, got {instances[0]!r}"
            )
        extra_input = instances[0].get("input")
    return [{"role": "user", "content": _instruction_with_input(instruction, extra_input, source)}]


def _prompt_messages(prompt: Any, source: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _message_list(prompt, "prompt", _MESSAGES_ROLES, source)
    raise DataError(
        f"{source}: field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
    )


# ---------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------

PLAIN_CHAT_TEMPLATE = """\
{%- if eos_token is not defined or not eos_token %}
    {{- raise_exception('The plain chat template needs a tokenizer with an eos_token.') }}
{%- endif %}
{%- if bos_token is defined and bos_token %}
    {{- bos_token }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {{- message['content'] + '\\n\\n' }}
    {%- elif message['role'] == 'user' %}
        {{- 'User: ' + message['content'] + '\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- 'Assistant: ' + message['content'] + eos_token + '\\n' }}
    {%- else %}
        {{- raise_exception('The plain chat template has no role ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant:' }}
{%- endif %}"""
"""Chat template for tokenizers without one, such as base models.

A conversation (system, user, assistant, user, assistant) renders as::

    <bos>{system}\\n\\nUser: {user}\\nAssistant: {assistant}<eos>\\nUser: {user}\\nAssistant: {assistant}<eos>\\n

where <bos> and <eos> are the tokenizer's bos_token and eos_token strings (<bos> is left out when the
tokenizer has none, and rendering fails when it has no eos_token). The generation prompt is
"Assistant:" with no trailing space, for two reasons:

- the rendering of a prefix with add_generation_prompt=True is then a prefix of the full rendering,
  so a prompt at generation time is the same text that preceded the answer in training;
- the space after the colon belongs to the answer, so SentencePiece-style tokenizers produce their
  usual word-initial tokens ("▁Hello") and BPE tokenizers like GPT-2 theirs ("ĠHello").

The assistant span that is trained is " {assistant}<eos>\\n". The eos_token and bos_token strings become
their special token ids when the rendered text is tokenized, because Hugging Face tokenizers match
registered special tokens in the text before splitting the rest. The tests check this for the
stories260k tokenizer ("<s>" -> 1, "</s>" -> 2) and GPT-2 ("<|endoftext|>" -> 50256).
"""


def resolve_chat_template(tokenizer: Any, chat_template: str | os.PathLike[str] = "auto") -> str:
    """Return the Jinja text of the chat template selected by `chat_template`.

    - "auto": the tokenizer's own template, or PLAIN_CHAT_TEMPLATE when it has none (logged);
    - "model": the tokenizer's own template, and DataError when it has none;
    - "plain": PLAIN_CHAT_TEMPLATE;
    - a path ending in ".jinja": the file's text (DataError when it is missing);
    - any other string containing "{%" or "{{": used as the template text itself.
    """
    location = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    own_template = _tokenizer_chat_template(tokenizer)
    choice = os.fspath(chat_template)

    if choice == "auto":
        if own_template is not None:
            return own_template
        logger.warning(
            "Tokenizer at %s has no chat template, so the plain template is used (User:/Assistant: lines, "
            "see caft.data.PLAIN_CHAT_TEMPLATE).",
            location,
        )
        return PLAIN_CHAT_TEMPLATE
    if choice == "model":
        if own_template is None:
            raise DataError(
                f"tokenizer at {location} has no chat template; set chat_template to 'plain' or a .jinja file"
            )
        return own_template
    if choice == "plain":
        return PLAIN_CHAT_TEMPLATE
    if choice.endswith(".jinja"):
        template_path = Path(choice)
        if not template_path.is_file():
            raise DataError(f"chat template file {choice} not found. Check the path")
        return template_path.read_text(encoding="utf-8")
    if "{%" in choice or "{{" in choice:
        return choice
    raise DataError(
        f"invalid chat_template {choice!r}: use 'auto', 'model', 'plain', a path to a .jinja file, "
        "or the Jinja template text itself"
    )


def _tokenizer_chat_template(tokenizer: Any) -> str | None:
    """Return the tokenizer's default chat template, or None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        # Some tokenizers store several named templates, and "default" is the one for plain chat.
        template = template.get("default")
    return template or None


# ---------------------------------------------------------------------------------------------------
# Encoding: rendered text -> input_ids and labels
# ---------------------------------------------------------------------------------------------------


# Explanations shared by log messages and errors.
_UNSUPERVISED_REASON = (
    "the chat template renders them differently inside the full conversation, "
    "or a token crosses the start or end of the turn"
)
_PROMPT_MISMATCH_REASON = (
    "follow a prompt that tokenizes differently on its own than inside the conversation, so "
    "encode_prompt's ids differ from the training ids before the answer"
)


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    chat_template: str,
    *,
    source: str = "conversation",
    stats: DataStats | None = None,
) -> tuple[list[int], list[int]]:
    """Tokenize a rendered conversation and return (input_ids, labels).

    labels[i] equals input_ids[i] for tokens of assistant turns, end-of-turn tokens included, and
    IGNORE_INDEX elsewhere. `chat_template` is template text, as returned by resolve_chat_template.
    The ids come from one tokenization of the full rendering, without adding special tokens because
    chat templates write BOS themselves. `source` names the row in error messages.

    Two problems are counted in `stats`, or logged as warnings when `stats` is None:

    - turns_unsupervised: an assistant turn that cannot be located on token boundaries (see
      `_assistant_turn_span`) is left untrained rather than risk labelling prompt tokens;
    - turns_prompt_mismatch: a trained turn whose preceding text tokenizes differently on its own,
      so encode_prompt for that point of the conversation does not return the training ids.

    Raises DataError when the template fails on this conversation or the tokenizer has no offsets.
    """
    if "{%" not in chat_template and "{{" not in chat_template:
        raise DataError(
            f"chat_template {chat_template!r} is not Jinja template text. Pass it through "
            "resolve_chat_template first"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} is not a fast (Rust tokenizers) tokenizer, so it returns no "
            "character offsets, which the assistant-token labels are computed from. Load it with use_fast=True"
        )
    messages = [dict(message) for message in messages]
    full_text = _render(tokenizer, messages, chat_template, False, source)
    # verbose=False silences the tokenizer's warning about rows longer than the model's maximum
    # length, because build_supervised_dataset truncates and counts those rows itself.
    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    input_ids = list(encoding["input_ids"])
    offsets = [tuple(offset) for offset in encoding["offset_mapping"]]

    labels = [IGNORE_INDEX] * len(input_ids)
    unsupervised_turns = 0
    mismatched_prompts = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _assistant_turn_span(tokenizer, messages, index, chat_template, full_text, source)
        positions = []
        if span is not None and not _token_crosses_boundary(span, offsets):
            positions = [
                position
                for position, (token_start, token_end) in enumerate(offsets)
                if _token_inside_span(token_start, token_end, span)
            ]
        if not positions:
            logger.debug("%s: assistant message %d (0-based) is not trained", source, index)
            unsupervised_turns += 1
            continue
        for position in positions:
            labels[position] = input_ids[position]

        # The text before the turn is the prompt at generation time. A pre-tokenizer can split its end
        # differently when nothing follows: GPT-2 makes one token of a final "\n\n" but two of "\n\n"
        # before a word. The labels stay right, but the generation prompt then has ids unlike training.
        prompt_ids = tokenizer(full_text[: span.start], add_special_tokens=False, verbose=False)["input_ids"]
        if list(prompt_ids) != input_ids[: positions[0]]:
            mismatched_prompts += 1

    if stats is not None:
        stats.turns_unsupervised += unsupervised_turns
        stats.turns_prompt_mismatch += mismatched_prompts
    else:
        if unsupervised_turns:
            logger.warning(
                "%s: %d assistant turn(s) not trained: %s", source, unsupervised_turns, _UNSUPERVISED_REASON
            )
        if mismatched_prompts:
            logger.warning("%s: %d assistant turn(s) %s", source, mismatched_prompts, _PROMPT_MISMATCH_REASON)
    return input_ids, labels


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], chat_template: str) -> list[int]:
    """Return the token ids of `messages` rendered with the generation prompt, for generation.

    Rendering and tokenization match encode_conversation, so when the template's generation prompt
    is a prefix of its rendering of the answered turn, these ids are a prefix of the training ids.
    Templates whose generation prompt adds text (DeepSeek-R1's "<think>\\n") differ by that text, and
    so do prompts whose end the tokenizer splits differently (counted as turns_prompt_mismatch).
    """
    text = _render(tokenizer, [dict(message) for message in messages], chat_template, True, "prompt")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    chat_template: str,
    add_generation_prompt: bool,
    source: str,
) -> str:
    """Render messages as text, turning the template's own errors into DataError."""
    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except jinja2.TemplateError as error:
        # Templates raise for conversations they do not support, for example Gemma 2 for a system
        # message and Mistral for roles that do not alternate user/assistant.
        raise DataError(
            f"{source}: the chat template cannot render this conversation: {error}. "
            "Change the row, or set chat_template to one that supports it (for example 'plain')"
        ) from error


@dataclass(frozen=True)
class _TurnSpan:
    """Characters [start, end) of one assistant turn in the rendered conversation."""

    start: int
    end: int
    # False when the end was found by comparing renderings that differ after the turn. Such an end
    # may lie a few characters past the turn's true end, inside text shared with what follows.
    end_is_exact: bool


def _assistant_turn_span(
    tokenizer: Any,
    messages: list[dict[str, str]],
    index: int,
    chat_template: str,
    full_text: str,
    source: str,
) -> _TurnSpan | None:
    """Locate assistant message `index` in `full_text` as a character span, or return None.

    Three renderings of the conversation up to this turn are compared:

    - prompt = messages[:index] with the generation prompt, the model's input at generation time;
    - history = messages[:index] without the generation prompt;
    - turn = messages[:index + 1] without the generation prompt.

    The turn starts where `prompt` and `turn` stop agreeing. Usually all of `prompt` is a prefix of
    `turn`, but a generation prompt may add text that the answered turn lacks (DeepSeek-R1 adds
    "<think>\\n"), and that text is not trained because the model never has to write it.

    The turn ends at the end of `turn` when `turn` is a prefix of `full_text`. Some templates append
    text only after the last message (Phi-3.5 appends eos_token). Then the turn ends where `turn` and
    `full_text` stop agreeing, provided that the rest of `turn` is exactly how `full_text` ends.

    None means the turn cannot be located safely, so it is not trained:

    - the turn is the first message, so there is no prompt to render;
    - `turn` does not keep the text that `history` and `prompt` share, because adding the turn
      rewrote earlier text (Mistral Nemo renders the system message in the last user turn, and
      drops it when an assistant turn is last);
    - `turn` differs from `full_text` before the turn ends and its rest is not how `full_text` ends,
      because later messages rewrite this turn (reasoning templates strip earlier reasoning).
    """
    if index == 0:
        return None
    prompt = _render(tokenizer, messages[:index], chat_template, True, source)
    history = _render(tokenizer, messages[:index], chat_template, False, source)
    turn = _render(tokenizer, messages[: index + 1], chat_template, False, source)

    # `history` and `prompt` can end differently (Phi-3.5 ends a conversation with eos_token but
    # a prompt with "<|assistant|>\n"), so only their common part must survive in `turn`.
    history_end = _common_prefix_length(history, prompt)
    start = _common_prefix_length(prompt, turn)
    if start < history_end:
        return None

    end_is_exact = full_text.startswith(turn)
    if end_is_exact:
        end = len(turn)
    else:
        end = _common_prefix_length(turn, full_text)
        if not full_text.endswith(turn[end:]):
            return None
    if end <= start:
        return None
    return _TurnSpan(start, end, end_is_exact)


def _token_crosses_boundary(span: _TurnSpan, offsets: list[tuple[int, int]]) -> bool:
    """Return True when a token contains both text of the turn and text before or after it.

    Such a token at the start means the prompt tokenizes differently at generation time. At the end,
    it means the turn's last characters cannot be trained on their own. The end is only checked when
    it is exact, because an end found by comparing renderings may lie inside text shared with the
    next turn.
    """
    for token_start, token_end in offsets:
        if token_start < span.start < token_end:
            return True
        if span.end_is_exact and token_start < span.end < token_end:
            return True
    return False


def _token_inside_span(token_start: int, token_end: int, span: _TurnSpan) -> bool:
    # A zero-width token belongs to the span when it sits before one of the span's characters.
    if token_start == token_end:
        return span.start <= token_start < span.end
    return span.start <= token_start and token_end <= span.end


def _common_prefix_length(first: str, second: str) -> int:
    length = 0
    for first_char, second_char in zip(first, second):
        if first_char != second_char:
            break
        length += 1
    return length


# ---------------------------------------------------------------------------------------------------
# Building the dataset
# ---------------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """Counts from build_supervised_dataset, to log and to check how much of a file was trained."""

    rows_read: int = 0
    rows_used: int = 0
    # Rows cut to max_length, including those then dropped.
    rows_truncated: int = 0
    # Rows left with no trained token, after truncation or because no turn could be located.
    rows_dropped_no_target: int = 0
    # Assistant turns left untrained because they could not be located on token boundaries.
    turns_unsupervised: int = 0
    # Trained assistant turns whose prompt text tokenizes differently on its own (see encode_conversation).
    turns_prompt_mismatch: int = 0
    # Tokens and trained tokens in the used rows, after truncation.
    tokens: int = 0
    supervised_tokens: int = 0

    def summary(self) -> str:
        """Format every count on one line."""
        return (
            f"read {self.rows_read} rows, used {self.rows_used}, {self.rows_truncated} truncated to max_length, "
            f"{self.rows_dropped_no_target} dropped with no trained token. "
            f"{self.turns_unsupervised} assistant turns untrained, "
            f"{self.turns_prompt_mismatch} with a prompt that tokenizes differently on its own. "
            f"{self.tokens} tokens, {self.supervised_tokens} of them trained"
        )

    def log_summary(self, name: str = "Training data") -> None:
        """Log summary() after `name` at warning level when data was lost or prompts mismatch, else at info level."""
        problems = (
            self.rows_truncated
            or self.rows_dropped_no_target
            or self.turns_unsupervised
            or self.turns_prompt_mismatch
        )
        logger.log(logging.WARNING if problems else logging.INFO, "%s: %s", name, self.summary())


class SupervisedDataset(Dataset):
    """Encoded rows as dicts {"input_ids": list[int], "labels": list[int]}, for CAFTDataCollator to pad."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def build_supervised_dataset(
    path: str | os.PathLike[str],
    tokenizer: Any,
    max_length: int,
    chat_template: str | os.PathLike[str] = "auto",
    prompt_field: str | None = None,
    completion_field: str | None = None,
    max_rows: int | None = None,
) -> tuple[SupervisedDataset, DataStats]:
    """Load, encode and truncate a training file, and return the dataset with its counts.

    Rows longer than `max_length` tokens keep their first `max_length` tokens. Rows left with no
    trained token (for example a prompt longer than `max_length`) are dropped. The counts are logged,
    at warning level when anything was truncated, dropped or left untrained. `chat_template` takes the
    values of resolve_chat_template, and the other arguments are those of load_conversations.

    Raises DataError when no row is left.
    """
    if max_length < 1:
        raise DataError(f"max_length must be a positive number of tokens, got {max_length!r}")

    conversations = load_conversations(path, prompt_field, completion_field, max_rows)
    template = resolve_chat_template(tokenizer, chat_template)
    stats = DataStats(rows_read=len(conversations))

    examples = []
    for conversation in conversations:
        input_ids, labels = encode_conversation(
            tokenizer, conversation.messages, template, source=conversation.source, stats=stats
        )
        if len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            stats.rows_truncated += 1
        supervised = sum(label != IGNORE_INDEX for label in labels)
        if supervised == 0:
            stats.rows_dropped_no_target += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
        stats.rows_used += 1
        stats.tokens += len(input_ids)
        stats.supervised_tokens += supervised

    stats.log_summary(f"Data {path}")
    if not examples:
        reasons = []
        if stats.rows_truncated:
            reasons.append(
                f"{stats.rows_truncated} rows were longer than max_length={max_length}, so raise max_length"
            )
        if stats.turns_unsupervised:
            reasons.append(
                f"{stats.turns_unsupervised} assistant turns were not trained because {_UNSUPERVISED_REASON}. "
                "Set chat_template to another template, or register the template's special tokens in the tokenizer"
            )
        raise DataError(
            f"{path}: all {stats.rows_read} rows were dropped because none kept a trained token. "
            + ". ".join(reasons)
        )
    return SupervisedDataset(examples), stats


# ---------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------


def resolve_pad_token_id(tokenizer: Any) -> int:
    """Return the token id to pad with: the pad token, else EOS, else UNK.

    Padding positions get attention_mask 0 and label IGNORE_INDEX, so reusing EOS or UNK for padding
    does not change what the model is trained on.
    """
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            if name != "pad_token_id":
                logger.info("Tokenizer has no pad token, so padding uses %s=%d.", name, token_id)
            return int(token_id)
    raise DataError(
        f"tokenizer at {getattr(tokenizer, 'name_or_path', '?')} has no pad, eos or unk token to pad with. "
        "Set tokenizer.pad_token"
    )


@dataclass
class CAFTDataCollator:
    """Pad a batch of {"input_ids", "labels"} rows on the right to the longest row.

    Returns LongTensors input_ids, attention_mask and labels of shape (batch, length). Padding gets
    `pad_token_id`, attention_mask 0 and label IGNORE_INDEX. With `pad_to_multiple_of`, the length is
    rounded up to a multiple of it.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be a positive integer or None, got {self.pad_to_multiple_of}"
            )

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        for index, feature in enumerate(features):
            if len(feature["input_ids"]) != len(feature["labels"]):
                raise ValueError(
                    f"row {index} of the batch has {len(feature['input_ids'])} input_ids but "
                    f"{len(feature['labels'])} labels"
                )

        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of is not None:
            # Ceiling division rounds the length up to the next multiple.
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            row_length = len(feature["input_ids"])
            input_ids[row, :row_length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, :row_length] = 1
            labels[row, :row_length] = torch.as_tensor(feature["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
