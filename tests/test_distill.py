"""`caft distill` on the real stories260k model: batching, resuming, turns, mixing and bad inputs."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from caft.cli import build_parser, main
from caft.data import encode_prompt, load_conversations, load_prompts, resolve_chat_template
from caft.distill import (
    DistillOptions,
    HFGenerator,
    PromptSource,
    SamplingSettings,
    load_prompt_files,
    metadata_path,
    resolve_backend,
    run_distill,
    select_prompts,
)

STORIES_EOS = 2
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stories(stories_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(stories_model_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_model_dir).eval()
    return tokenizer, model, resolve_chat_template(tokenizer, "plain")


@pytest.fixture
def mt_bench(assets):
    return assets / "data" / "instruct" / "mt-bench" / "mt_bench_question.jsonl"


@pytest.fixture
def seed_tasks(assets):
    return assets / "data" / "instruct" / "self-instruct" / "seed_tasks.jsonl"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _options(model_dir, prompts, output, **overrides):
    settings = {"max_new_tokens": 12, "batch_size": 2, "chat_template": "plain"}
    settings.update(overrides)
    return DistillOptions(
        model=str(model_dir), prompts=[str(path) for path in prompts], output=str(output), **settings
    )


def _cli_argv(model_dir, prompts, output, *extra):
    return [
        "distill",
        "--model",
        str(model_dir),
        "--prompts",
        *[str(path) for path in prompts],
        "--output",
        str(output),
        "--chat-template",
        "plain",
        *extra,
    ]


def _cli_error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Generation


def test_batched_greedy_matches_single_prompts(tmp_path, stories, stories_model_dir):
    tokenizer, model, template = stories
    texts = [
        "Tell me a story.",
        "Write a short story about a cat who finds a red ball in the garden and plays all day.",
        "What is a dog and why do children like to play with dogs?",
        "Once upon a time there was a girl named Lily who loved the park. What did she do there?",
        "Say hi.",
    ]
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in texts])
    lengths = [len(encode_prompt(tokenizer, [{"role": "user", "content": text}], template)) for text in texts]
    assert len(set(lengths)) == len(texts)  # so every batch needs left padding

    result = run_distill(
        _options(stories_model_dir, [prompts], tmp_path / "out.jsonl", batch_size=3, max_new_tokens=20)
    )
    rows = _read_rows(result.output)
    assert len(rows) == len(texts)

    for row in rows:
        user = row["conversation"][0]
        prompt_ids = encode_prompt(tokenizer, [user], template)
        with torch.no_grad():
            output = model.generate(
                input_ids=torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=STORIES_EOS,
                pad_token_id=STORIES_EOS,
            )
        new_tokens = output[0, len(prompt_ids) :].tolist()
        stopped = STORIES_EOS in new_tokens
        if stopped:
            new_tokens = new_tokens[: new_tokens.index(STORIES_EOS)]
        expected = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        assert row["conversation"][1] == {"role": "assistant", "content": expected}, row["prompt_id"]
        assert row["generated_tokens"] == [len(new_tokens)]
        assert row["finish_reasons"] == ["stop" if stopped else "length"]


def test_output_trains_as_conversations(tmp_path, stories_model_dir, seed_tasks):
    result = run_distill(_options(stories_model_dir, [seed_tasks], tmp_path / "out.jsonl", num_prompts=4))
    conversations = load_conversations(result.output)
    assert len(conversations) == 4
    assert [message["role"] for message in conversations[0].messages] == ["user", "assistant"]


class RecordingGenerator:
    """Wrap a generator and keep every batch of prompt ids it receives."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.sampling = inner.sampling
        self.calls = []

    def generate(self, prompts, seed):
        self.calls.append([list(prompt) for prompt in prompts])
        return self.inner.generate(prompts, seed)


def test_second_turn_sees_own_first_answer(tmp_path, stories, stories_model_dir, mt_bench):
    tokenizer, model, template = stories
    options = _options(stories_model_dir, [mt_bench], tmp_path / "out.jsonl", num_prompts=6)
    generator = RecordingGenerator(HFGenerator(model, STORIES_EOS, [STORIES_EOS], options.sampling()))
    result = run_distill(options, generator=generator)

    rows = [row for row in _read_rows(result.output) if len(row["generated_tokens"]) == 2]
    assert rows, "no MT-bench prompt fit two turns in the context"
    recorded = [prompt for call in generator.calls for prompt in call]
    for row in rows:
        user1, assistant1, user2, assistant2 = row["conversation"]
        assert [user1["role"], assistant1["role"], user2["role"], assistant2["role"]] == [
            "user",
            "assistant",
            "user",
            "assistant",
        ]
        assert encode_prompt(tokenizer, [user1], template) in recorded
        assert encode_prompt(tokenizer, [user1, assistant1, user2], template) in recorded

    # Turns are generated in separate calls: no call mixes first and second turns.
    second_turn_prompts = [encode_prompt(tokenizer, row["conversation"][:3], template) for row in rows]
    calls_with_second_turns = 0
    for call in generator.calls:
        second_turns = [prompt in second_turn_prompts for prompt in call]
        assert all(second_turns) or not any(second_turns)
        calls_with_second_turns += all(second_turns)
    assert calls_with_second_turns >= 1


# ---------------------------------------------------------------------------------------------------
# Resuming


def _kill_after_first_rows(command, output, minimum_rows=2):
    """Start `command` and SIGKILL it once `output` has `minimum_rows` complete rows."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        command, cwd=REPOSITORY, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if output.is_file() and output.read_bytes().count(b"\n") >= minimum_rows:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_killed_run_resumes_exactly(tmp_path, stories_model_dir, seed_tasks, sampling):
    extra = ["--num-prompts", "30", "--max-new-tokens", "24", "--batch-size", "2", "--seed", "3"]
    if sampling:
        extra += ["--do-sample", "--temperature", "0.9", "--top-k", "40"]
    reference = tmp_path / "reference.jsonl"
    assert main(_cli_argv(stories_model_dir, [seed_tasks], reference, *extra)) == 0

    output = tmp_path / "interrupted.jsonl"
    command = [sys.executable, "-m", "caft.cli", *_cli_argv(stories_model_dir, [seed_tasks], output, *extra)]
    _kill_after_first_rows(command, output)
    assert len(_read_rows_tolerant(output)) < 30

    assert main(_cli_argv(stories_model_dir, [seed_tasks], output, *extra)) == 0
    assert output.read_bytes() == reference.read_bytes()
    metadata = json.loads(metadata_path(output).read_text())
    assert metadata["complete"] is True
    assert metadata["counts"] == json.loads(metadata_path(reference).read_text())["counts"]


def _read_rows_tolerant(path):
    """Rows of a file that may end with a partial line."""
    return [line for line in path.read_bytes().split(b"\n")[:-1] if line]


def test_truncated_output_resumes_partial_batch(tmp_path, stories_model_dir, seed_tasks, caplog):
    options = {"num_prompts": 8, "batch_size": 2, "do_sample": True, "temperature": 1.0, "seed": 5}
    reference = tmp_path / "reference.jsonl"
    run_distill(_options(stories_model_dir, [seed_tasks], reference, **options))
    lines = reference.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 8

    # Three whole rows (batch 0 and half of batch 1) and half of the fourth, as a crash mid-write leaves.
    output = tmp_path / "crashed.jsonl"
    output.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][: len(lines[3]) // 2])
    shutil.copy(metadata_path(reference), metadata_path(output))

    caplog.set_level(logging.WARNING, logger="caft.distill")
    result = run_distill(_options(stories_model_dir, [seed_tasks], output, **options))
    assert output.read_bytes() == reference.read_bytes()
    assert result.rows_added == 5
    assert "removing an incomplete last row" in caplog.text

    greedy = run_distill(
        _options(stories_model_dir, [seed_tasks], tmp_path / "greedy.jsonl", num_prompts=8, seed=5)
    )
    assert _read_rows(greedy.output) != _read_rows(reference)  # sampling is on in the reference


def test_rerun_of_complete_output_adds_nothing(tmp_path, stories_model_dir, seed_tasks):
    options = _options(stories_model_dir, [seed_tasks], tmp_path / "out.jsonl", num_prompts=3)
    first = run_distill(options)
    content = first.output.read_bytes()
    second = run_distill(options)
    assert second.rows_added == 0
    assert second.tokens_this_run == 0
    assert first.output.read_bytes() == content


def test_resume_with_other_settings_rejected(tmp_path, capsys, stories_model_dir, seed_tasks):
    output = tmp_path / "out.jsonl"
    argv = _cli_argv(stories_model_dir, [seed_tasks], output, "--num-prompts", "2", "--max-new-tokens", "4")
    assert main(argv) == 0
    content = output.read_bytes()

    message = _cli_error(
        capsys,
        _cli_argv(
            stories_model_dir,
            [seed_tasks],
            output,
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "6",
            "--seed",
            "1",
        ),
    )
    assert "other settings" in message
    assert "max_new_tokens: 4 -> 6" in message
    assert "seed: 0 -> 1" in message
    assert output.read_bytes() == content


def test_output_without_metadata_rejected(tmp_path, capsys, stories_model_dir, seed_tasks):
    output = _write_jsonl(tmp_path / "out.jsonl", [{"conversation": [], "prompt_id": "x:0"}])
    message = _cli_error(capsys, _cli_argv(stories_model_dir, [seed_tasks], output, "--num-prompts", "2"))
    assert f"its metadata file {metadata_path(output)} does not" in message


# ---------------------------------------------------------------------------------------------------
# Prompts and mixing


def _prompt_file(folder, name, count):
    return _write_jsonl(folder / name, [{"prompt": f"{name} prompt {index}"} for index in range(count)])


def _file_of(prompt_id):
    return Path(prompt_id.rpartition(":")[0]).name


def test_mixture_follows_weights(tmp_path):
    first = _prompt_file(tmp_path, "first.jsonl", 20)
    second = _prompt_file(tmp_path, "second.jsonl", 20)
    files = load_prompt_files([PromptSource(str(first), 3), PromptSource(str(second), 1)])

    selected = select_prompts(files, 8, seed=0)
    names = [_file_of(prompt.prompt_id) for prompt in selected]
    assert names.count("first.jsonl") == 6
    assert names.count("second.jsonl") == 2
    assert len({prompt.prompt_id for prompt in selected}) == 8


def test_mixture_deterministic_for_seed(tmp_path):
    first = _prompt_file(tmp_path, "first.jsonl", 30)
    second = _prompt_file(tmp_path, "second.jsonl", 30)
    sources = [PromptSource(str(first), 2), PromptSource(str(second), 1)]

    def ids(seed):
        return [prompt.prompt_id for prompt in select_prompts(load_prompt_files(sources), 12, seed)]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)
    assert sorted(ids(7)) != sorted(ids(8))  # another seed draws other prompts, not only another order


def test_mixture_small_file_gives_all(tmp_path):
    large = _prompt_file(tmp_path, "large.jsonl", 20)
    small = _prompt_file(tmp_path, "small.jsonl", 2)
    files = load_prompt_files([PromptSource(str(large)), PromptSource(str(small))])
    names = [_file_of(prompt.prompt_id) for prompt in select_prompts(files, 10, seed=0)]
    assert names.count("small.jsonl") == 2
    assert names.count("large.jsonl") == 8


def test_mixture_rounding_by_largest_remainder(tmp_path):
    paths = [_prompt_file(tmp_path, f"file{index}.jsonl", 10) for index in range(3)]
    files = load_prompt_files([PromptSource(str(path)) for path in paths])
    names = [_file_of(prompt.prompt_id) for prompt in select_prompts(files, 10, seed=0)]
    # 10/3 each: the one left over goes to the file listed first.
    assert [names.count(f"file{index}.jsonl") for index in range(3)] == [4, 3, 3]


def test_mixture_default_uses_every_prompt(tmp_path):
    first = _prompt_file(tmp_path, "first.jsonl", 5)
    second = _prompt_file(tmp_path, "second.jsonl", 3)
    files = load_prompt_files([PromptSource(str(first), 5), PromptSource(str(second))])
    selected = select_prompts(files, None, seed=0)
    assert sorted(prompt.prompt_id for prompt in selected) == sorted(
        [f"{first}:{index}" for index in range(5)] + [f"{second}:{index}" for index in range(3)]
    )


def test_too_many_prompts_rejected(tmp_path):
    files = load_prompt_files([PromptSource(str(_prompt_file(tmp_path, "few.jsonl", 3)))])
    with pytest.raises(ValueError, match="more than the 3 prompts"):
        select_prompts(files, 4, seed=0)


@pytest.mark.parametrize(
    "text, path, weight",
    [
        ("prompts.jsonl", "prompts.jsonl", 1.0),
        ("prompts.jsonl:2.5", "prompts.jsonl", 2.5),
        ("data/a:b.jsonl", "data/a:b.jsonl", 1.0),
        ("data/a:b.jsonl:3", "data/a:b.jsonl", 3.0),
    ],
)
def test_prompt_source_parsed(text, path, weight):
    assert PromptSource.parse(text) == PromptSource(path, weight)


@pytest.mark.parametrize("text", ["prompts.jsonl:0", "prompts.jsonl:-1", "prompts.jsonl:nan"])
def test_prompt_source_bad_weight_rejected(text):
    with pytest.raises(ValueError, match="weight must be a positive number"):
        PromptSource.parse(text)


def test_prompt_file_listed_twice_rejected(tmp_path):
    path = _prompt_file(tmp_path, "twice.jsonl", 2)
    with pytest.raises(ValueError, match="twice"):
        load_prompt_files([PromptSource(str(path)), PromptSource(str(path), 2)])


def test_prompt_shapes_drop_answers(tmp_path):
    rows = [
        {
            "conversation": [
                {"role": "system", "content": "Be brief."},
                {"role": "human", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"},
            ]
        },
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"instruction": "Translate.", "input": "Hallo", "output": "Hello"},
        {"instruction": "Count to three.", "input": "", "output": "1 2 3"},
        {"instruction": "No output field."},
        {"prompt": "P", "completion": "C"},
        {
            "prompt": [{"role": "user", "content": "P2"}],
            "completion": [{"role": "assistant", "content": "C2"}],
        },
        {"question_id": 81, "category": "writing", "turns": ["First turn", "Second turn"]},
        {
            "id": "seed_task_0",
            "instruction": "Sort the list.",
            "instances": [{"input": "3, 1, 2", "output": "1, 2, 3"}, {"input": "b, a", "output": "a, b"}],
        },
        {"id": "seed_task_1", "instruction": "Tell a joke.", "instances": [{"input": "", "output": "..."}]},
    ]
    path = _write_jsonl(tmp_path / "shapes.jsonl", rows)

    def user(text):
        return {"role": "user", "content": text}

    expected = [
        [{"role": "system", "content": "Be brief."}, user("Hi"), user("Bye")],
        [user("Q")],
        [user("Translate.\n\nHallo")],
        [user("Count to three.")],
        [user("No output field.")],
        [user("P")],
        [user("P2")],
        [user("First turn"), user("Second turn")],
        [user("Sort the list.\n\n3, 1, 2")],
        [user("Tell a joke.")],
    ]
    assert [prompt.messages for prompt in load_prompts(path)] == expected

    turns = load_prompt_files([PromptSource(str(path))])[0].prompts[0].turns
    assert turns == [[{"role": "system", "content": "Be brief."}, user("Hi")], [user("Bye")]]


def test_real_prompt_files_load(assets, mt_bench, seed_tasks):
    alpaca = load_prompts(assets / "data" / "instruct" / "alpaca-demo" / "alpaca_en_demo.json")
    assert len(alpaca) == 999
    assert all(message["role"] == "user" for prompt in alpaca for message in prompt.messages)

    questions = load_prompts(mt_bench)
    assert len(questions) == 80
    assert all([message["role"] for message in prompt.messages] == ["user", "user"] for prompt in questions)

    raw = [json.loads(line) for line in seed_tasks.read_text().splitlines()]
    tasks = load_prompts(seed_tasks)
    assert len(tasks) == len(raw) == 175
    with_input = next(index for index, row in enumerate(raw) if row["instances"][0]["input"].strip())
    row = raw[with_input]
    assert tasks[with_input].messages == [
        {"role": "user", "content": row["instruction"] + "\n\n" + row["instances"][0]["input"]}
    ]


# ---------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("content", ["", "[]", "\n\n"])
def test_empty_prompt_file_rejected(tmp_path, capsys, stories_model_dir, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    message = _cli_error(capsys, _cli_argv(stories_model_dir, [path], tmp_path / "out.jsonl"))
    assert f"{path}: the file contains no prompts" in message


def test_long_prompt_skipped_and_counted(tmp_path, capsys, caplog, stories_model_dir):
    long_text = "Tell me about " + "the big red ball and the little dog " * 20
    prompts = _write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "Say hi."}, {"prompt": long_text}, {"prompt": "Tell a story."}],
    )
    output = tmp_path / "out.jsonl"
    caplog.set_level(logging.WARNING, logger="caft.distill")
    assert (
        main(_cli_argv(stories_model_dir, [prompts], output, "--max-length", "96", "--max-new-tokens", "8"))
        == 0
    )

    assert f"{prompts}:2: skipped" in caplog.text  # line 2 of the file, as caft.data names rows
    assert "1 were skipped as longer than the context" in capsys.readouterr().out
    assert f"{prompts}:1" not in {row["prompt_id"] for row in _read_rows(output)}
    metadata = json.loads(metadata_path(output).read_text())
    assert metadata["counts"]["prompts_skipped_too_long"] == 1
    assert metadata["counts"]["rows_written"] == 2
    assert metadata["skipped_too_long"] == [f"{prompts}:1"]


def test_all_prompts_too_long_rejected(tmp_path, capsys, stories_model_dir):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a long prompt " * 40}])
    message = _cli_error(
        capsys,
        _cli_argv(
            stories_model_dir,
            [prompts],
            tmp_path / "out.jsonl",
            "--max-length",
            "64",
            "--max-new-tokens",
            "8",
        ),
    )
    assert "all 1 selected prompts are too long" in message
    assert not (tmp_path / "out.jsonl").exists()


def test_model_without_eos_rejected(tmp_path, capsys, stories_model_dir, seed_tasks):
    model_dir = tmp_path / "no-eos"
    shutil.copytree(stories_model_dir, model_dir)
    for name, key in [
        ("config.json", "eos_token_id"),
        ("generation_config.json", "eos_token_id"),
        ("tokenizer_config.json", "eos_token"),
    ]:
        content = json.loads((model_dir / name).read_text())
        content[key] = None
        (model_dir / name).write_text(json.dumps(content))
    assert AutoTokenizer.from_pretrained(model_dir).eos_token_id is None

    message = _cli_error(
        capsys, _cli_argv(model_dir, [seed_tasks], tmp_path / "out.jsonl", "--num-prompts", "2")
    )
    assert "has no end-of-sequence token" in message
    assert "generation could not stop" in message


def test_output_in_missing_folder_rejected(tmp_path, capsys, stories_model_dir, seed_tasks):
    folder = tmp_path / "missing"
    message = _cli_error(capsys, _cli_argv(stories_model_dir, [seed_tasks], folder / "out.jsonl"))
    assert f"output folder {folder} does not exist" in message


def test_context_without_room_rejected(tmp_path, capsys, stories_model_dir, seed_tasks):
    message = _cli_error(
        capsys,
        _cli_argv(
            stories_model_dir,
            [seed_tasks],
            tmp_path / "out.jsonl",
            "--max-length",
            "64",
            "--max-new-tokens",
            "64",
        ),
    )
    assert "--max-new-tokens 64 leaves no room for a prompt" in message


def test_vllm_backend_unavailable_rejected():
    assert resolve_backend("auto") == "hf"  # no vLLM or CUDA on the test machines
    with pytest.raises(ValueError, match="vllm"):
        resolve_backend("vllm")


def test_sampling_settings_validated():
    with pytest.raises(ValueError, match="--top-p"):
        SamplingSettings(max_new_tokens=4, do_sample=True, top_p=0)
    with pytest.raises(ValueError, match="--temperature"):
        SamplingSettings(max_new_tokens=4, do_sample=True, temperature=0)


def test_help_states_units_and_defaults():
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.choices and "distill" in action.choices)
    text = " ".join(subparsers.choices["distill"].format_help().split())
    for option in [
        "--prompts",
        "--num-prompts",
        "--max-new-tokens",
        "--do-sample",
        "--top-p",
        "--top-k",
        "--seed",
    ]:
        assert option in text
    assert "Default: 256." in text
    assert "Context limit in tokens" in text
    assert "Default: the model's max_position_embeddings." in text
