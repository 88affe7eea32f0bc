"""`caft heads info` and `caft heads push`, with a stand-in for the Hub client (no network)."""

import json

import pytest

from caft import CAFTConfig, add_auxiliary_heads, load_heads, save_heads
from caft.cli import main
from caft.heads_hub import heads_info, push_heads
from tiny_models import make_tiny_model


class FakeHubApi:
    """Records calls and keeps uploaded files in a local folder instead of the Hub."""

    def __init__(self, store):
        self.store = store
        self.calls = []

    def create_repo(self, repo_id, private, exist_ok, repo_type):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
        import shutil

        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self.store / repo_id, dirs_exist_ok=True)


@pytest.fixture
def heads_folder(tmp_path):
    model = make_tiny_model("llama")
    model.config._name_or_path = "org/tiny-llama"
    caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=2))
    folder = tmp_path / "run" / "heads"
    save_heads(caft_model, folder)
    metrics = {"initial": {"top1": [0.01, 0.02]}, "final": {"top1": [0.3, 0.2]}}
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_info_text(heads_folder, capsys):
    assert main(["heads", "info", str(heads_folder)]) == 0
    text = capsys.readouterr().out
    assert "org/tiny-llama (LlamaForCausalLM)" in text
    assert "2 x transformer" in text
    assert "t+2 .. t+3" in text
    assert "top-1 (final):  t+2: 0.3000, t+3: 0.2000" in text


def test_info_json(heads_folder, capsys):
    assert main(["heads", "info", str(heads_folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_model"]["hidden_size"] == 32
    assert info["caft_config"]["num_aux_heads"] == 2
    assert info["accuracy"]["initial"]["top1"] == [0.01, 0.02]


def test_info_missing_folder(tmp_path, capsys):
    assert main(["heads", "info", str(tmp_path / "absent")]) == 2
    assert "not found" in capsys.readouterr().err


def test_push_uploads_files_and_card(heads_folder, tmp_path):
    api = FakeHubApi(tmp_path / "hub")
    url = push_heads(heads_folder, "me/tiny-heads", private=True, api=api)
    assert url == "https://hub.example/me/tiny-heads"
    assert api.calls[0] == ("create_repo", "me/tiny-heads", True)
    uploaded = tmp_path / "hub" / "me" / "tiny-heads"
    assert sorted(path.name for path in uploaded.iterdir()) == ["README.md", "heads.safetensors", "heads_config.json"]
    card = (uploaded / "README.md").read_text()
    assert "org/tiny-llama" in card
    assert "--heads me/tiny-heads" in card


def test_push_rejects_bad_input(heads_folder, tmp_path):
    api = FakeHubApi(tmp_path / "hub")
    with pytest.raises(ValueError, match="OWNER/NAME"):
        push_heads(heads_folder, "no-owner", api=api)
    with pytest.raises(FileNotFoundError):
        push_heads(tmp_path / "absent", "me/x", api=api)
    assert api.calls == []  # nothing was created before the checks


def test_pushed_heads_load_by_repository_id(heads_folder, tmp_path, monkeypatch):
    # What `--heads OWNER/NAME` does after a push: download the repository, then load it.
    api = FakeHubApi(tmp_path / "hub")
    push_heads(heads_folder, "me/tiny-heads", api=api)
    requested = []

    def fake_snapshot_download(repo_id, allow_patterns):
        requested.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "hub" / repo_id)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = make_tiny_model("llama")
    model.config._name_or_path = "org/tiny-llama"
    caft_model = load_heads(model, "me/tiny-heads")
    assert len(caft_model.heads) == 2
    assert requested == [("me/tiny-heads", ("heads_config.json", "heads.safetensors"))]
    assert heads_info(tmp_path / "hub" / "me" / "tiny-heads")["caft_config"]["num_aux_heads"] == 2
