"""The heads file format: round trip, metadata, and refusal of heads made for another model."""

import json

import pytest
import torch

from caft import CAFTConfig, HeadsMismatchError, add_auxiliary_heads, load_heads, save_heads
from caft.heads_io import CONFIG_NAME, WEIGHTS_NAME, read_heads_metadata
from tiny_models import make_tiny_model, random_batch


def _named(model, name):
    model.config._name_or_path = name
    return model


def _perturb(heads):
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)


@pytest.mark.parametrize("head_type", ["transformer", "resblock"])
def test_save_load_round_trip(tmp_path, head_type):
    config = CAFTConfig(num_aux_heads=2, head_type=head_type, separate_unembedding=True)
    source = add_auxiliary_heads(_named(make_tiny_model("llama"), "org/tiny-llama"), config)
    _perturb(source.heads)
    save_heads(source, tmp_path / "heads")

    fresh = _named(make_tiny_model("llama"), "org/tiny-llama")
    loaded = load_heads(fresh, tmp_path / "heads")
    assert loaded.caft_config == config
    for (name, expected), (_, actual) in zip(
        source.heads.state_dict().items(), loaded.heads.state_dict().items()
    ):
        assert torch.equal(expected, actual), name

    input_ids, attention_mask, labels = random_batch()
    with torch.no_grad():
        first = source(input_ids, attention_mask=attention_mask, labels=labels)
        second = loaded(input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(first.head_losses, second.head_losses)


def test_metadata_records_base_model(tmp_path):
    caft_model = add_auxiliary_heads(
        _named(make_tiny_model("qwen2"), "org/tiny-qwen"), CAFTConfig(num_aux_heads=3)
    )
    save_heads(caft_model, tmp_path)
    metadata = read_heads_metadata(tmp_path)
    assert metadata["base_model"] == {
        "name_or_path": "org/tiny-qwen",
        "architecture": "Qwen2ForCausalLM",
        "model_type": "qwen2",
        "hidden_size": 32,
        "vocab_size": 128,
        "num_hidden_layers": 2,
    }
    assert metadata["caft_config"]["num_aux_heads"] == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_load_into_existing_caft_model_in_place(tmp_path):
    config = CAFTConfig(num_aux_heads=2)
    source = add_auxiliary_heads(_named(make_tiny_model("llama"), "tiny"), config)
    _perturb(source.heads)
    save_heads(source, tmp_path)
    target = add_auxiliary_heads(_named(make_tiny_model("llama"), "tiny"), config)
    result = load_heads(target, tmp_path)
    assert result is target
    assert torch.equal(
        result.heads[0].layers[0].mlp.up_proj.weight, source.heads[0].layers[0].mlp.up_proj.weight
    )


def test_other_architecture_refused(tmp_path):
    source = add_auxiliary_heads(
        _named(make_tiny_model("llama"), "org/llama-tiny"), CAFTConfig(num_aux_heads=2)
    )
    save_heads(source, tmp_path)
    other = _named(make_tiny_model("gpt2"), "org/gpt2-tiny")
    with pytest.raises(HeadsMismatchError) as error:
        load_heads(other, tmp_path)
    message = str(error.value)
    assert "org/llama-tiny" in message
    assert "org/gpt2-tiny" in message
    assert "architecture" in message


def test_same_shapes_other_name_refused_unless_allowed(tmp_path):
    source = add_auxiliary_heads(
        _named(make_tiny_model("llama"), "org/base-model"), CAFTConfig(num_aux_heads=1)
    )
    save_heads(source, tmp_path)
    other = _named(make_tiny_model("llama", seed=1), "org/instruct-model")
    with pytest.raises(HeadsMismatchError, match="org/base-model.*org/instruct-model"):
        load_heads(other, tmp_path)
    loaded = load_heads(other, tmp_path, allow_other_base=True)
    assert len(loaded.heads) == 1


def test_local_copy_of_same_model_accepted(tmp_path):
    source = add_auxiliary_heads(_named(make_tiny_model("llama"), "org/stories"), CAFTConfig(num_aux_heads=1))
    save_heads(source, tmp_path)
    local = _named(make_tiny_model("llama"), "/data/models/stories")
    assert len(load_heads(local, tmp_path).heads) == 1


def test_not_a_heads_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a heads folder"):
        load_heads(make_tiny_model("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_heads(make_tiny_model("llama"), tmp_path / "missing")


def test_corrupt_config_named(tmp_path):
    source = add_auxiliary_heads(make_tiny_model("llama"), CAFTConfig(num_aux_heads=1))
    save_heads(source, tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=CONFIG_NAME):
        load_heads(make_tiny_model("llama"), tmp_path)


def test_save_leaves_no_temporary_files(tmp_path):
    source = add_auxiliary_heads(make_tiny_model("llama"), CAFTConfig(num_aux_heads=1))
    save_heads(source, tmp_path)
    save_heads(source, tmp_path)  # overwrite
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    json.loads((tmp_path / CONFIG_NAME).read_text())
