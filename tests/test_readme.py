"""The README's Python API example runs as written, on the real stories260k model."""

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path, stories_model_dir, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Count to {n}."},
                {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))},
            ]
        }
        for n in range(2, 10)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    code = code.replace('"path/or/hub-id"', repr(str(stories_model_dir)))
    monkeypatch.chdir(tmp_path)  # train.jsonl and the out/ folders are relative to the working directory

    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)

    assert (tmp_path / "out" / "heads" / "heads.safetensors").is_file()
    plain_model = namespace["plain_model"]
    assert type(plain_model).__name__ == "LlamaForCausalLM"
    assert not any(name.startswith("heads") for name, _ in plain_model.named_parameters())
