"""Tests for caft.data: row shapes, assistant-only labels on real chat templates, bad inputs, batching.

Real tokenizers, chat templates and datasets come from the shared assets folder. The CAFT_ASSETS
environment variable names it (default ../shared, see caft.assets), and tests that need it skip when
it is missing.
"""

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from caft.assets import assets_dir
from caft.data import (
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    CAFTDataCollator,
    Conversation,
    DataError,
    DataStats,
    build_supervised_dataset,
    encode_conversation,
    encode_prompt,
    load_conversations,
    resolve_chat_template,
    resolve_pad_token_id,
)

ASSETS = assets_dir()


def asset(relative_path: str) -> Path:
    path = ASSETS / relative_path
    if not path.exists():
        pytest.skip(f"{path} not found: set CAFT_ASSETS to the shared assets folder (default ../shared)")
    return path


@lru_cache(maxsize=None)
def _load_tokenizer(relative_path: str, special_tokens: tuple[tuple[str, object], ...] = ()):
    tokenizer = AutoTokenizer.from_pretrained(str(asset(relative_path)))
    settings = dict(special_tokens)
    if settings:
        tokenizer.add_special_tokens(
            {"eos_token": settings["eos"], "additional_special_tokens": list(settings["control"])}
        )
        if settings["bos"] is None:
            tokenizer.bos_token = None
        else:
            tokenizer.add_special_tokens({"bos_token": settings["bos"]})
    return tokenizer


def stories_tokenizer():
    return _load_tokenizer("models/stories260k")


def gpt2_tokenizer():
    return _load_tokenizer("tokenizers/gpt2")


def phi3_tokenizer():
    return _load_tokenizer("tokenizers/phi-3-hf")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    """Token index ranges [start, end) of consecutive labelled positions."""
    runs = []
    start = None
    for position, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        if label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    return runs


# ---------------------------------------------------------------------------------------------------
# Row shapes
# ---------------------------------------------------------------------------------------------------


def test_conversation_shape_maps_human_to_user(tmp_path):
    row = {
        "conversation": [
            {"role": "system", "content": "Be kind."},
            {"role": "human", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    path = write_jsonl(tmp_path / "train.jsonl", [row])

    [conversation] = load_conversations(path)

    assert conversation.messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    assert conversation.source == f"{path}:1"


def test_messages_shape_drops_extra_keys(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "2+2?", "name": "alice"},
            {"role": "assistant", "content": "4"},
        ],
        "id": 7,
    }
    path = write_jsonl(tmp_path / "train.jsonl", [row])

    [conversation] = load_conversations(path)

    assert conversation.messages == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_alpaca_shape_joins_input(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"instruction": "Say bye.", "output": "Bye"},
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)

    conversations = load_conversations(path)

    assert [c.messages[0]["content"] for c in conversations] == [
        "Add the numbers.\n\n2 and 3",
        "Say hi.",
        "Say bye.",
    ]
    assert [c.messages[1] for c in conversations] == [
        {"role": "assistant", "content": "5"},
        {"role": "assistant", "content": "Hi"},
        {"role": "assistant", "content": "Bye"},
    ]


def test_prompt_completion_strings(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Capital of France?", "completion": " Paris."}])

    [conversation] = load_conversations(path)

    assert conversation.messages == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": " Paris."},
    ]


def test_prompt_completion_trl_conversational(tmp_path):
    row = {
        "prompt": [
            {"role": "system", "content": "Short answers."},
            {"role": "user", "content": "Capital of Peru?"},
        ],
        "completion": [{"role": "assistant", "content": "Lima."}],
    }
    path = write_jsonl(tmp_path / "pc.jsonl", [row])

    [conversation] = load_conversations(path)

    assert conversation.messages == row["prompt"] + row["completion"]


def test_trl_prompt_with_assistant_rejected(tmp_path):
    row = {
        "prompt": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        "completion": [{"role": "assistant", "content": "d"}],
    }
    path = write_jsonl(tmp_path / "pc.jsonl", [row])

    with pytest.raises(DataError, match="'prompt' contains an assistant message") as error:
        load_conversations(path)
    assert f"{path}:1" in str(error.value)


def test_prompt_and_completion_fields(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Why?", "a": "Because.", "other": 1}])

    [conversation] = load_conversations(path, prompt_field="q", completion_field="a")

    assert conversation.messages == [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
    ]


def test_prompt_field_needs_completion_field(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Why?", "a": "Because."}])

    with pytest.raises(DataError, match="set both"):
        load_conversations(path, prompt_field="q")


def test_missing_prompt_field_names_fields(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Why?", "a": "Because."}])

    with pytest.raises(DataError, match="no field 'question'") as error:
        load_conversations(path, prompt_field="question", completion_field="a")
    assert f"{path}:1" in str(error.value)


def test_gsm8k_rows_with_field_mapping():
    path = asset("data/math/gsm8k/train.jsonl")
    with path.open(encoding="utf-8") as file:
        expected_rows = [json.loads(next(file)) for _ in range(3)]

    conversations = load_conversations(path, prompt_field="question", completion_field="answer", max_rows=3)

    assert len(conversations) == 3
    for line_number, (conversation, row) in enumerate(zip(conversations, expected_rows), start=1):
        assert conversation.messages == [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
        assert conversation.source == f"{path}:{line_number}"


def test_alpaca_demo_json_array():
    path = asset("data/instruct/alpaca-demo/alpaca_en_demo.json")
    rows = json.loads(path.read_text(encoding="utf-8"))

    conversations = load_conversations(path)

    assert len(conversations) == len(rows)
    with_input = next(index for index, row in enumerate(rows) if row["input"])
    without_input = next(index for index, row in enumerate(rows) if not row["input"])
    assert conversations[with_input].messages[0]["content"] == (
        rows[with_input]["instruction"] + "\n\n" + rows[with_input]["input"]
    )
    assert conversations[without_input].messages[0]["content"] == rows[without_input]["instruction"]
    assert conversations[with_input].messages[1]["content"] == rows[with_input]["output"]
    assert conversations[with_input].source == f"{path} row {with_input} (0-based)"


def test_jsonl_skips_blank_lines_and_counts_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    row = {"prompt": "p", "completion": "c"}
    path.write_text(json.dumps(row) + "\n\n   \n" + json.dumps(row) + "\n", encoding="utf-8")

    conversations = load_conversations(path)

    assert [c.source for c in conversations] == [f"{path}:1", f"{path}:4"]


def test_max_rows_stops_reading(tmp_path):
    rows = [{"prompt": str(i), "completion": "c"} for i in range(5)] + ["not an object"]
    path = write_jsonl(tmp_path / "train.jsonl", rows)

    conversations = load_conversations(path, max_rows=2)

    assert [c.messages[0]["content"] for c in conversations] == ["0", "1"]


def test_json_array_file_with_jsonl_extension(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps([{"prompt": "p", "completion": "c"}], indent=2), encoding="utf-8")

    [conversation] = load_conversations(path)

    assert conversation.source == f"{path} row 0 (0-based)"


# ---------------------------------------------------------------------------------------------------
# Bad input files
# ---------------------------------------------------------------------------------------------------

GOOD_ROW = {"prompt": "p", "completion": "c"}


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + '\n{"prompt": "p", "completion": \n', encoding="utf-8")

    with pytest.raises(DataError, match="invalid JSON") as error:
        load_conversations(path)
    assert f"{path}:2:" in str(error.value)


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": "p",,}\n]\n', encoding="utf-8")

    with pytest.raises(DataError, match="invalid JSON") as error:
        load_conversations(path)
    assert f"{path}:3:" in str(error.value)


def test_unknown_role(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW, row])

    with pytest.raises(DataError, match="unknown role 'bot'") as error:
        load_conversations(path)
    message = str(error.value)
    assert f"{path}:2" in message
    assert "'system', 'user', 'assistant'" in message


def test_human_role_rejected_in_messages(tmp_path):
    row = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [row])

    with pytest.raises(DataError, match="unknown role 'human'"):
        load_conversations(path)


def test_empty_assistant_turn(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n "}]}
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW, GOOD_ROW, row])

    with pytest.raises(DataError, match="empty assistant turn") as error:
        load_conversations(path)
    assert f"{path}:3" in str(error.value)


def test_empty_alpaca_output(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Say hi.", "input": "", "output": ""}])

    with pytest.raises(DataError, match="empty assistant turn") as error:
        load_conversations(path)
    assert f"{path}:1" in str(error.value)


def test_non_string_content(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}
    path = write_jsonl(tmp_path / "train.jsonl", [row])

    with pytest.raises(DataError, match="content must be a string, got int") as error:
        load_conversations(path)
    assert f"{path}:1" in str(error.value)


def test_row_of_no_known_shape(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])

    with pytest.raises(DataError, match="matches no accepted shape") as error:
        load_conversations(path)
    message = str(error.value)
    assert f"{path}:1" in message
    assert "answer, question" in message
    for shape_field in ('"conversation"', '"messages"', '"instruction"', '"prompt"', "prompt_field"):
        assert shape_field in message


def test_row_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW, ["prompt", "completion"]])

    with pytest.raises(DataError, match="expected a JSON object") as error:
        load_conversations(path)
    assert f"{path}:2" in str(error.value)


def test_json_array_bad_row_names_index(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD_ROW, {"prompt": "p", "completion": 3}]), encoding="utf-8")

    with pytest.raises(DataError, match="must both be strings") as error:
        load_conversations(path)
    assert f"{path} row 1 (0-based)" in str(error.value)


def test_no_assistant_turn(tmp_path):
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [row])

    with pytest.raises(DataError, match="no assistant turn") as error:
        load_conversations(path)
    assert f"{path}:1" in str(error.value)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"

    with pytest.raises(DataError, match="file not found") as error:
        load_conversations(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("text", ["", "\n  \n", "[]"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "train.jsonl"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(DataError, match="contains no rows") as error:
        load_conversations(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Chat template selection
# ---------------------------------------------------------------------------------------------------


def test_model_template_missing_raises():
    tokenizer = stories_tokenizer()

    with pytest.raises(
        DataError, match="has no chat template; set chat_template to 'plain' or a .jinja file"
    ):
        resolve_chat_template(tokenizer, "model")


def test_auto_falls_back_to_plain(caplog):
    tokenizer = stories_tokenizer()

    with caplog.at_level(logging.INFO, logger="caft.data"):
        template = resolve_chat_template(tokenizer, "auto")

    assert template == PLAIN_CHAT_TEMPLATE
    assert "plain template" in caplog.text


def test_auto_and_model_use_tokenizer_template():
    tokenizer = phi3_tokenizer()
    expected = asset("tokenizers/phi-3-hf/chat_template.jinja").read_text(encoding="utf-8")

    assert resolve_chat_template(tokenizer, "auto") == expected
    assert resolve_chat_template(tokenizer, "model") == expected
    assert resolve_chat_template(tokenizer, "plain") == PLAIN_CHAT_TEMPLATE


def test_template_from_file_and_text(tmp_path):
    tokenizer = stories_tokenizer()
    template_path = tmp_path / "mine.jinja"
    template_path.write_text("{{ messages[0]['content'] }}", encoding="utf-8")

    assert resolve_chat_template(tokenizer, template_path) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template(tokenizer, str(template_path)) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template(tokenizer, "{% for m in messages %}{% endfor %}").startswith("{% for")


def test_template_file_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_chat_template(stories_tokenizer(), str(tmp_path / "absent.jinja"))


def test_template_name_unknown():
    with pytest.raises(DataError, match="invalid chat_template 'chatml'"):
        resolve_chat_template(stories_tokenizer(), "chatml")


# ---------------------------------------------------------------------------------------------------
# The plain template
# ---------------------------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You answer briefly."}
TWO_TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.\nFour, in words."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six."},
]


def test_plain_template_renders_documented_format():
    tokenizer = stories_tokenizer()

    text = tokenizer.apply_chat_template(
        [SYSTEM, *TWO_TURNS], chat_template=PLAIN_CHAT_TEMPLATE, tokenize=False
    )
    prompt = tokenizer.apply_chat_template(
        [SYSTEM, *TWO_TURNS[:3]],
        chat_template=PLAIN_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )

    assert text == (
        "<s>You answer briefly.\n\nUser: What is 2+2?\nAssistant: It is 4.\nFour, in words.</s>\n"
        "User: And 3+3?\nAssistant: Six.</s>\n"
    )
    assert prompt == (
        "<s>You answer briefly.\n\nUser: What is 2+2?\nAssistant: It is 4.\nFour, in words.</s>\n"
        "User: And 3+3?\nAssistant:"
    )
    assert text.startswith(prompt)


def test_plain_template_special_ids_on_stories():
    tokenizer = stories_tokenizer()

    input_ids, labels = encode_conversation(tokenizer, TWO_TURNS, PLAIN_CHAT_TEMPLATE)

    assert input_ids[0] == 1  # "<s>" became the BOS id, not the characters "<", "s", ">"
    assert input_ids.count(1) == 1
    assert input_ids.count(2) == 2  # one "</s>" per assistant turn
    eos_positions = [position for position, token in enumerate(input_ids) if token == 2]
    assert all(labels[position] == 2 for position in eos_positions)


@pytest.mark.parametrize("load_tokenizer", [stories_tokenizer, gpt2_tokenizer], ids=["stories260k", "gpt2"])
def test_plain_template_labels(load_tokenizer):
    tokenizer = load_tokenizer()
    messages = [SYSTEM, *TWO_TURNS]
    text = tokenizer.apply_chat_template(messages, chat_template=PLAIN_CHAT_TEMPLATE, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)

    input_ids, labels = encode_conversation(tokenizer, messages, PLAIN_CHAT_TEMPLATE)

    assert input_ids == encoding["input_ids"]
    runs = labelled_runs(labels)
    assert len(runs) == 2
    offsets = encoding["offset_mapping"]
    expected_texts = [f" {message['content']}{tokenizer.eos_token}\n" for message in TWO_TURNS[1::2]]
    for (start, end), expected in zip(runs, expected_texts):
        assert text[offsets[start][0] : offsets[end - 1][1]] == expected
        assert labels[start:end] == input_ids[start:end]
        assert tokenizer.eos_token_id in labels[start:end]
    # The answer's leading space starts a word token ("▁It" or "ĠIt") instead of being its own token.
    first_answer_token = tokenizer.convert_ids_to_tokens(input_ids[runs[0][0]])
    assert first_answer_token[0] in "▁Ġ"
    assert len(first_answer_token) > 1


@pytest.mark.parametrize("load_tokenizer", [stories_tokenizer, gpt2_tokenizer], ids=["stories260k", "gpt2"])
def test_plain_prompt_is_training_prefix(load_tokenizer):
    tokenizer = load_tokenizer()
    messages = [SYSTEM, *TWO_TURNS]

    input_ids, labels = encode_conversation(tokenizer, messages, PLAIN_CHAT_TEMPLATE)

    for (start, _), answer_index in zip(labelled_runs(labels), (2, 4)):
        prompt_ids = encode_prompt(tokenizer, messages[:answer_index], PLAIN_CHAT_TEMPLATE)
        assert prompt_ids == input_ids[:start]


def test_gpt2_plain_labels_decode_exactly():
    tokenizer = gpt2_tokenizer()

    input_ids, labels = encode_conversation(tokenizer, TWO_TURNS, PLAIN_CHAT_TEMPLATE)

    decoded = [tokenizer.decode(input_ids[start:end]) for start, end in labelled_runs(labels)]
    assert decoded == [" It is 4.\nFour, in words.<|endoftext|>\n", " Six.<|endoftext|>\n"]


# ---------------------------------------------------------------------------------------------------
# Real chat templates
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateCase:
    """A real chat template with the special tokens its model's tokenizer registers.

    end_of_turn is the text the template writes after each assistant message's content, and
    final_suffix the text it writes only after the last message. Both were read from the templates.
    """

    file_name: str | None  # None: the tokenizer's own template
    bos: str | None
    eos: str
    control: tuple[str, ...]
    end_of_turn: str
    stop_token: str
    final_suffix: str = ""
    generation_prompt_extra: str = ""  # text the generation prompt adds that the answered turn lacks
    accepts_system: bool = True
    # Tokenizers that split the end of the generation prompt differently when no answer follows.
    prompt_mismatch_tokenizers: tuple[str, ...] = ()


LLAMA3_CONTROL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

TEMPLATE_CASES = {
    "qwen2.5": TemplateCase(
        file_name="Qwen-Qwen2.5-7B-Instruct.jinja",
        bos=None,
        eos="<|im_end|>",
        control=("<|im_start|>", "<|im_end|>"),
        end_of_turn="<|im_end|>\n",
        stop_token="<|im_end|>",
    ),
    "deepseek-r1": TemplateCase(
        file_name="deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
        control=("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"),
        end_of_turn="<｜end▁of▁sentence｜>",
        stop_token="<｜end▁of▁sentence｜>",
        generation_prompt_extra="<think>\n",
    ),
    "gemma2": TemplateCase(
        file_name="google-gemma-2-2b-it.jinja",
        bos="<bos>",
        eos="<eos>",
        control=("<start_of_turn>", "<end_of_turn>"),
        end_of_turn="<end_of_turn>\n",
        stop_token="<end_of_turn>",
        accepts_system=False,
    ),
    "llama3.1": TemplateCase(
        file_name="meta-llama-Llama-3.1-8B-Instruct.jinja",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        control=LLAMA3_CONTROL,
        end_of_turn="<|eot_id|>",
        stop_token="<|eot_id|>",
        # GPT-2 makes one token of the prompt's final "\n\n", but two of "\n\n" before the answer.
        prompt_mismatch_tokenizers=("gpt2",),
    ),
    "llama3.2": TemplateCase(
        file_name="meta-llama-Llama-3.2-3B-Instruct.jinja",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        control=LLAMA3_CONTROL,
        end_of_turn="<|eot_id|>",
        stop_token="<|eot_id|>",
        prompt_mismatch_tokenizers=("gpt2",),
    ),
    "phi3.5": TemplateCase(
        file_name="microsoft-Phi-3.5-mini-instruct.jinja",
        bos="<s>",
        eos="<|endoftext|>",
        control=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        end_of_turn="<|end|>\n",
        stop_token="<|end|>",
        final_suffix="<|endoftext|>",
    ),
    # Mistral Nemo drops or moves the system message, which test_mistral_system_turns_unsupervised covers.
    "mistral-nemo": TemplateCase(
        file_name="mistralai-Mistral-Nemo-Instruct-2407.jinja",
        bos="<s>",
        eos="</s>",
        control=("[INST]", "[/INST]"),
        end_of_turn="</s>",
        stop_token="</s>",
        accepts_system=False,
    ),
    # The phi-3-hf tokenizer's own template silently leaves out system messages.
    "phi3-own": TemplateCase(
        file_name=None,
        bos="<s>",
        eos="<|endoftext|>",
        control=("<|user|>", "<|assistant|>", "<|end|>"),
        end_of_turn="<|end|>\n",
        stop_token="<|end|>",
        accepts_system=False,
    ),
}

TOKENIZER_PATHS = {"phi-3-hf": "tokenizers/phi-3-hf", "gpt2": "tokenizers/gpt2"}

SINGLE_TURN = TWO_TURNS[:2]
CONVERSATIONS = {
    "single": SINGLE_TURN,
    "multi": TWO_TURNS,
    "system-multi": [SYSTEM, *TWO_TURNS],
}


def template_setup(case_name: str, tokenizer_name: str):
    """Return (tokenizer, template text) with the template's special tokens registered."""
    case = TEMPLATE_CASES[case_name]
    if case.file_name is None:
        tokenizer = _load_tokenizer(TOKENIZER_PATHS[tokenizer_name])
        return tokenizer, tokenizer.chat_template
    special_tokens = (("bos", case.bos), ("eos", case.eos), ("control", case.control))
    tokenizer = _load_tokenizer(TOKENIZER_PATHS[tokenizer_name], special_tokens)
    template = asset(f"tokenizers/chat_templates/{case.file_name}").read_text(encoding="utf-8")
    return tokenizer, template


def template_masking_params():
    """Every template with both tokenizers and every conversation that the template supports."""
    params = []
    for case_name, case in TEMPLATE_CASES.items():
        # The tokenizer's own template is tested with that tokenizer only.
        tokenizer_names = ["phi-3-hf"] if case.file_name is None else list(TOKENIZER_PATHS)
        for tokenizer_name in tokenizer_names:
            for conversation_name, messages in CONVERSATIONS.items():
                if messages[0]["role"] == "system" and not case.accepts_system:
                    continue
                params.append(
                    pytest.param(
                        case_name,
                        tokenizer_name,
                        conversation_name,
                        id=f"{case_name}-{tokenizer_name}-{conversation_name}",
                    )
                )
    return params


@pytest.mark.parametrize(("case_name", "tokenizer_name", "conversation_name"), template_masking_params())
def test_template_masks_assistant_turns(case_name, tokenizer_name, conversation_name):
    case = TEMPLATE_CASES[case_name]
    messages = CONVERSATIONS[conversation_name]
    tokenizer, template = template_setup(case_name, tokenizer_name)
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    stats = DataStats()

    input_ids, labels = encode_conversation(tokenizer, messages, template, stats=stats)

    assert input_ids == encoding["input_ids"]
    assert stats.turns_unsupervised == 0
    prompt_mismatch = tokenizer_name in case.prompt_mismatch_tokenizers
    answers = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    runs = labelled_runs(labels)
    assert len(runs) == len(answers), "expected one contiguous labelled run per assistant turn"

    offsets = encoding["offset_mapping"]
    stop_id = tokenizer.convert_tokens_to_ids(case.stop_token)
    for turn_number, ((start, end), answer_index) in enumerate(zip(runs, answers)):
        expected = messages[answer_index]["content"] + case.end_of_turn
        if turn_number == len(answers) - 1:
            expected += case.final_suffix
        assert text[offsets[start][0] : offsets[end - 1][1]] == expected
        if tokenizer_name == "gpt2":  # byte-level BPE decodes to exactly the original text
            assert tokenizer.decode(input_ids[start:end]) == expected
        assert labels[start:end] == input_ids[start:end]
        assert stop_id in labels[start:end]

        # What precedes the answer is exactly what generation will be prompted with, unless the
        # tokenizer splits the prompt's end differently, which encode_conversation counts.
        prompt_ids = encode_prompt(tokenizer, messages[:answer_index], template)
        extra_ids = tokenizer(case.generation_prompt_extra, add_special_tokens=False)["input_ids"]
        assert (prompt_ids == input_ids[:start] + extra_ids) != prompt_mismatch
    assert stats.turns_prompt_mismatch == (len(answers) if prompt_mismatch else 0)


def test_deepseek_generation_prompt_think_not_labelled():
    tokenizer, template = template_setup("deepseek-r1", "gpt2")
    think_id = tokenizer.convert_tokens_to_ids("<think>")

    input_ids, labels = encode_conversation(tokenizer, SINGLE_TURN, template)
    prompt_ids = encode_prompt(tokenizer, SINGLE_TURN[:1], template)

    assert think_id in prompt_ids
    assert think_id not in input_ids
    assert tokenizer.decode(prompt_ids).endswith("<｜Assistant｜><think>\n")


def test_phi35_eos_only_after_last_turn():
    tokenizer, template = template_setup("phi3.5", "phi-3-hf")

    input_ids, labels = encode_conversation(tokenizer, TWO_TURNS, template)

    eos_positions = [position for position, token in enumerate(input_ids) if token == tokenizer.eos_token_id]
    assert eos_positions == [len(input_ids) - 1]
    assert labels[-1] == tokenizer.eos_token_id


def test_gemma_system_message_raises():
    tokenizer, template = template_setup("gemma2", "phi-3-hf")

    with pytest.raises(DataError, match="System role not supported") as error:
        encode_conversation(tokenizer, [SYSTEM, *SINGLE_TURN], template, source="chat.jsonl:4")
    assert "chat.jsonl:4" in str(error.value)


def test_mistral_roles_must_alternate(tmp_path):
    tokenizer, template = template_setup("mistral-nemo", "gpt2")
    template_path = tmp_path / "mistral.jinja"
    template_path.write_text(template, encoding="utf-8")
    row = {"messages": [TWO_TURNS[0], TWO_TURNS[0], TWO_TURNS[1]]}
    path = write_jsonl(tmp_path / "train.jsonl", [row])

    with pytest.raises(DataError, match="must alternate user/assistant") as error:
        build_supervised_dataset(path, tokenizer, max_length=64, chat_template=template_path)
    assert f"{path}:1" in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Templates that render history differently
# ---------------------------------------------------------------------------------------------------

# Like Qwen3 and other reasoning templates: the reasoning of earlier assistant turns is removed, while
# the last assistant turn keeps it.
STRIP_EARLIER_REASONING_TEMPLATE = """\
{%- for message in messages %}
    {%- set content = message['content'] %}
    {%- if message['role'] == 'assistant' and not loop.last and '</think>' in content %}
        {%- set content = content.split('</think>')[-1] %}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""


def test_rewritten_reasoning_turn_unsupervised():
    tokenizer, _ = template_setup("qwen2.5", "gpt2")
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>two and two</think>4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>three and three</think>6"},
    ]
    stats = DataStats()

    input_ids, labels = encode_conversation(
        tokenizer, messages, STRIP_EARLIER_REASONING_TEMPLATE, stats=stats
    )

    assert stats.turns_unsupervised == 1
    runs = labelled_runs(labels)
    assert [tokenizer.decode(input_ids[start:end]) for start, end in runs] == [
        "<think>three and three</think>6<|im_end|>\n"
    ]


def test_unrewritten_turns_stay_supervised():
    tokenizer, _ = template_setup("qwen2.5", "gpt2")
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>three and three</think>6"},
    ]
    stats = DataStats()

    input_ids, labels = encode_conversation(
        tokenizer, messages, STRIP_EARLIER_REASONING_TEMPLATE, stats=stats
    )

    assert stats.turns_unsupervised == 0
    assert [tokenizer.decode(input_ids[start:end]) for start, end in labelled_runs(labels)] == [
        "4<|im_end|>\n",
        "<think>three and three</think>6<|im_end|>\n",
    ]


@pytest.mark.parametrize("messages", [[SYSTEM, *SINGLE_TURN], [SYSTEM, *TWO_TURNS]], ids=["single", "multi"])
def test_mistral_system_turns_unsupervised(messages):
    # Mistral Nemo writes the system message into the last user turn of a prompt, and leaves it out
    # when the conversation ends with an assistant turn, so no turn renders as it would be prompted.
    tokenizer, template = template_setup("mistral-nemo", "phi-3-hf")
    stats = DataStats()

    input_ids, labels = encode_conversation(tokenizer, messages, template, stats=stats)

    assert stats.turns_unsupervised == sum(message["role"] == "assistant" for message in messages)
    assert set(labels) == {IGNORE_INDEX}


def test_mistral_system_rows_all_dropped(tmp_path):
    tokenizer, template = template_setup("mistral-nemo", "phi-3-hf")
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [SYSTEM, *TWO_TURNS]}])

    with pytest.raises(DataError, match="all 1 rows were dropped") as error:
        build_supervised_dataset(path, tokenizer, max_length=128, chat_template=template)
    assert "2 assistant turns were not trained" in str(error.value)


def test_unsupervised_turns_logged_without_stats(caplog):
    tokenizer, template = template_setup("mistral-nemo", "phi-3-hf")

    with caplog.at_level(logging.WARNING, logger="caft.data"):
        encode_conversation(tokenizer, [SYSTEM, *SINGLE_TURN], template, source="rows.jsonl:9")

    assert "rows.jsonl:9: 1 assistant turn(s) not trained" in caplog.text


def test_unregistered_control_tokens_leave_turns_untrained():
    # Without "<|eot_id|>" registered, the text "<|eot_id|><|start_header_id|>" tokenizes with a
    # token that crosses the end of the first assistant turn, so that turn cannot be trained alone.
    tokenizer = phi3_tokenizer()
    template = asset("tokenizers/chat_templates/meta-llama-Llama-3.1-8B-Instruct.jinja").read_text(
        encoding="utf-8"
    )
    stats = DataStats()

    input_ids, labels = encode_conversation(tokenizer, TWO_TURNS, template, stats=stats)

    assert stats.turns_unsupervised == 1
    assert len(labelled_runs(labels)) == 1


def test_assistant_first_message_unsupervised():
    tokenizer = gpt2_tokenizer()
    messages = [{"role": "assistant", "content": "Hello, ask me anything."}, *SINGLE_TURN]
    stats = DataStats()

    input_ids, labels = encode_conversation(tokenizer, messages, PLAIN_CHAT_TEMPLATE, stats=stats)

    assert stats.turns_unsupervised == 1
    assert [tokenizer.decode(input_ids[start:end]) for start, end in labelled_runs(labels)] == [
        " It is 4.\nFour, in words.<|endoftext|>\n"
    ]


def test_encode_needs_template_text():
    with pytest.raises(DataError, match="resolve_chat_template"):
        encode_conversation(gpt2_tokenizer(), SINGLE_TURN, "plain")


def test_encode_needs_fast_tokenizer():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(DataError, match="not a fast"):
        encode_conversation(SlowTokenizer(), SINGLE_TURN, PLAIN_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------------
# Building a dataset: truncation and dropped rows
# ---------------------------------------------------------------------------------------------------


def test_truncation_and_dropping(tmp_path, caplog):
    tokenizer = stories_tokenizer()
    short_prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Once upon a time " * 8},
    ]
    long_prompt = [
        {"role": "user", "content": "Tell me a story " * 10},
        {"role": "assistant", "content": "No."},
    ]
    short_ids, short_labels = encode_conversation(tokenizer, short_prompt, PLAIN_CHAT_TEMPLATE)
    long_ids, long_labels = encode_conversation(tokenizer, long_prompt, PLAIN_CHAT_TEMPLATE)
    first_label = next(position for position, label in enumerate(short_labels) if label != IGNORE_INDEX)
    max_length = first_label + 3
    assert max_length < len(short_ids)
    assert all(label == IGNORE_INDEX for label in long_labels[:max_length])  # its prompt alone is too long
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": short_prompt}, {"messages": long_prompt}])

    with caplog.at_level(logging.INFO, logger="caft.data"):
        dataset, stats = build_supervised_dataset(
            path, tokenizer, max_length=max_length, chat_template="plain"
        )

    assert len(dataset) == 1
    assert dataset[0] == {"input_ids": short_ids[:max_length], "labels": short_labels[:max_length]}
    assert stats == DataStats(
        rows_read=2,
        rows_used=1,
        rows_truncated=2,
        rows_dropped_no_target=1,
        turns_unsupervised=0,
        tokens=max_length,
        supervised_tokens=3,
    )
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert any("2 truncated" in record.getMessage() for record in warnings)


def test_all_rows_dropped_raises(tmp_path):
    tokenizer = stories_tokenizer()
    rows = [{"prompt": "Tell me a long story about a cat " * 5, "completion": "No."}] * 3
    path = write_jsonl(tmp_path / "train.jsonl", rows)

    with pytest.raises(DataError, match="all 3 rows were dropped") as error:
        build_supervised_dataset(path, tokenizer, max_length=16, chat_template="plain")
    assert "raise max_length" in str(error.value)


def test_gsm8k_dataset_counts():
    tokenizer = stories_tokenizer()
    path = asset("data/math/gsm8k/train.jsonl")

    dataset, stats = build_supervised_dataset(
        path, tokenizer, max_length=256, prompt_field="question", completion_field="answer", max_rows=20
    )

    assert stats.rows_read == 20
    assert stats.rows_used + stats.rows_dropped_no_target == 20
    assert stats.rows_used == len(dataset)
    assert stats.tokens == sum(len(example["input_ids"]) for example in dataset)
    assert stats.supervised_tokens == sum(
        sum(label != IGNORE_INDEX for label in example["labels"]) for example in dataset
    )
    for example in dataset:
        assert len(example["input_ids"]) == len(example["labels"]) <= 256
        assert example["input_ids"][0] == tokenizer.bos_token_id
        assert example["labels"][0] == IGNORE_INDEX


def test_alpaca_demo_dataset_builds():
    tokenizer = stories_tokenizer()
    path = asset("data/instruct/alpaca-demo/alpaca_en_demo.json")

    dataset, stats = build_supervised_dataset(path, tokenizer, max_length=512, max_rows=200)

    assert stats.rows_read == 200
    assert stats.turns_unsupervised == 0
    assert len(dataset) == stats.rows_used > 0
    untruncated = [example for example in dataset if len(example["input_ids"]) < 512]
    assert untruncated, "expected rows that fit in 512 tokens"
    newline_id = tokenizer.convert_tokens_to_ids("<0x0A>")
    for example in untruncated:
        assert example["labels"][-2:] == [tokenizer.eos_token_id, newline_id]


def test_max_length_must_be_positive(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW])

    with pytest.raises(DataError, match="max_length"):
        build_supervised_dataset(path, stories_tokenizer(), max_length=0)


def test_conversation_dataclass_fields():
    conversation = Conversation(messages=[{"role": "user", "content": "x"}], source="a.jsonl:1")

    assert conversation.source == "a.jsonl:1"


# ---------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------


def test_pad_token_fallbacks():
    class NoSpecialTokens:
        name_or_path = "stub"
        pad_token_id = None
        eos_token_id = None
        unk_token_id = None

    assert resolve_pad_token_id(phi3_tokenizer()) == 32000  # its own pad token "<|endoftext|>"
    assert resolve_pad_token_id(stories_tokenizer()) == 2  # no pad token, so EOS "</s>"
    with pytest.raises(DataError, match="no pad, eos or unk token"):
        resolve_pad_token_id(NoSpecialTokens())


def test_collator_pads_right():
    features = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]

    batch = CAFTDataCollator(pad_token_id=0)(features)

    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))


def test_collator_pad_to_multiple_of():
    features = [
        {"input_ids": [5, 6, 7, 9, 10], "labels": [5, 6, 7, 9, 10]},
        {"input_ids": [8], "labels": [-100]},
    ]

    batch = CAFTDataCollator(pad_token_id=2, pad_to_multiple_of=4)(features)

    assert torch.equal(
        batch["input_ids"], torch.tensor([[5, 6, 7, 9, 10, 2, 2, 2], [8, 2, 2, 2, 2, 2, 2, 2]])
    )
    expected_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    expected_labels = torch.tensor([[5, 6, 7, 9, 10, -100, -100, -100], [-100] * 8])
    assert torch.equal(batch["attention_mask"], expected_mask)
    assert torch.equal(batch["labels"], expected_labels)


def test_collator_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="row 0 of the batch has 2 input_ids but 1 labels"):
        CAFTDataCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [1]}])


def test_collator_on_built_dataset(tmp_path):
    tokenizer = stories_tokenizer()
    rows = [
        {"prompt": "Hi", "completion": "Hello."},
        {"prompt": "Tell me a story.", "completion": "Once upon a time."},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dataset, _ = build_supervised_dataset(path, tokenizer, max_length=64)
    collator = CAFTDataCollator(pad_token_id=resolve_pad_token_id(tokenizer))

    batch = collator([dataset[0], dataset[1]])

    lengths = [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert batch["labels"][row, :length].tolist() == dataset[row]["labels"]
        assert batch["labels"][row, length:].eq(IGNORE_INDEX).all()
