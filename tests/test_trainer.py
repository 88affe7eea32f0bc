"""CAFTTrainer: per-head logging, checkpoints that restore the heads, and resumed runs."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from caft import CAFTConfig, CAFTTrainer, add_auxiliary_heads, apply_lora
from caft.lora import prepare_full_finetuning
from tiny_models import make_tiny_model, random_batch


def _rows(count=8, seq_len=12):
    input_ids, attention_mask, labels = random_batch(batch_size=count, seq_len=seq_len, pad_last=3)
    return [
        {"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]}
        for i in range(count)
    ]


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_steps=2,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _model(arch="llama", lora=False):
    caft_model = add_auxiliary_heads(make_tiny_model(arch), CAFTConfig(num_aux_heads=2))
    if lora:
        apply_lora(caft_model, r=4, alpha=8, dropout=0.0)
    else:
        prepare_full_finetuning(caft_model)
    return caft_model


def test_logs_per_head_metrics(tmp_path):
    trainer = CAFTTrainer(
        model=_model(), mode="caft", args=_args(tmp_path), train_dataset=_rows(), eval_dataset=_rows(4)
    )
    trainer.train()
    metrics = trainer.evaluate()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 4
    for key in ("head1_loss", "head2_loss", "head3_loss", "head1_acc", "head3_acc", "heads_weight"):
        assert key in train_logs[0], key
    for key in ("eval_head1_loss", "eval_head2_loss", "eval_head3_acc"):
        assert key in metrics, key
    # heads_weight follows beta * s(t) * sum gamma^(k-1) with s(t) = sin(pi/2 (1 - t/T)).
    assert train_logs[0]["heads_weight"] > train_logs[-1]["heads_weight"]
    assert train_logs[-1]["heads_weight"] == pytest.approx(0.0, abs=1e-9)


def test_ntp_mode_logs_only_next_token(tmp_path):
    trainer = CAFTTrainer(
        model=_model(), mode="ntp", args=_args(tmp_path, max_steps=1), train_dataset=_rows()
    )
    trainer.train()
    log = [entry for entry in trainer.state.log_history if "loss" in entry][0]
    assert "head1_loss" in log
    assert "head2_loss" not in log
    assert log["loss"] == pytest.approx(log["head1_loss"], rel=1e-5)


def test_rejects_plain_model(tmp_path):
    with pytest.raises(TypeError, match="CAFTModel"):
        CAFTTrainer(model=make_tiny_model("llama"), args=_args(tmp_path))


def test_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        CAFTTrainer(model=_model(), mode="mtp", args=_args(tmp_path))


def test_rejects_nothing_trainable(tmp_path):
    caft_model = add_auxiliary_heads(make_tiny_model("llama"), CAFTConfig(num_aux_heads=1))
    caft_model.set_trainable(trunk=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        CAFTTrainer(model=caft_model, mode="caft", args=_args(tmp_path))


def test_checkpoint_contains_base_and_heads(tmp_path):
    trainer = CAFTTrainer(
        model=_model(lora=True), mode="caft", args=_args(tmp_path, max_steps=2), train_dataset=_rows()
    )
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / "heads" / "heads.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # LoRA checkpoints hold the adapter only


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("mode,train_heads", [("caft", True), ("heads", False)])
def test_resume_matches_uninterrupted_run(tmp_path, lora, mode, train_heads):
    rows = _rows()
    first = _model(lora=lora)
    CAFTTrainer(
        model=first, mode=mode, train_heads=train_heads, args=_args(tmp_path / "a"), train_dataset=rows
    ).train()

    # A new process would build the model again from scratch: other random heads, fresh LoRA.
    torch.manual_seed(123)
    second = _model(lora=lora)
    with torch.no_grad():
        for parameter in second.heads.parameters():
            parameter.add_(1.0)
    trainer = CAFTTrainer(
        model=second, mode=mode, train_heads=train_heads, args=_args(tmp_path / "a"), train_dataset=rows
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))

    for (name, expected), (_, actual) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_restores_heads_from_checkpoint(tmp_path):
    trainer = CAFTTrainer(
        model=_model(), mode="heads", args=_args(tmp_path, max_steps=2), train_dataset=_rows()
    )
    trainer.train()
    saved = load_file(str(tmp_path / "checkpoint-2" / "heads" / "heads.safetensors"))

    other = _model()
    resumed = CAFTTrainer(model=other, mode="heads", args=_args(tmp_path, max_steps=2), train_dataset=_rows())
    resumed._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    for name, tensor in other.heads.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_resume_from_foreign_checkpoint_named(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    trainer = CAFTTrainer(model=_model(), mode="caft", args=_args(tmp_path), train_dataset=_rows())
    with pytest.raises(ValueError, match="not a CAFT checkpoint"):
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))


def test_gradient_accumulation_divides_loss(tmp_path):
    # Two micro-batches of 1 accumulated must give the same update as the mean of their losses:
    # with plain SGD the parameter change equals lr * mean gradient.
    rows = _rows(2)
    args = dict(
        max_steps=1, optim="sgd", learning_rate=1.0, save_strategy="no", logging_steps=1, max_grad_norm=0
    )
    accumulated = _model()
    before = {n: p.detach().clone() for n, p in accumulated.named_parameters()}
    CAFTTrainer(
        model=accumulated,
        mode="caft",
        args=_args(tmp_path / "acc", per_device_train_batch_size=1, gradient_accumulation_steps=2, **args),
        train_dataset=rows,
    ).train()

    manual = _model()
    manual.zero_grad()
    for row in rows:
        batch = {key: value.unsqueeze(0) for key, value in row.items()}
        (manual(**batch, mode="caft").loss / 2).backward()
    for name, parameter in accumulated.named_parameters():
        if parameter.requires_grad and before[name].ne(parameter.detach()).any():
            expected_change = -dict(manual.named_parameters())[name].grad
            torch.testing.assert_close(
                parameter.detach() - before[name], expected_change, rtol=1e-3, atol=1e-6
            )


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_same_losses(tmp_path, lora):
    histories = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        caft_model = _model(lora=lora)
        args = _args(
            tmp_path / str(checkpointing),
            max_steps=3,
            save_strategy="no",
            activation_checkpointing=checkpointing,
        )
        trainer = CAFTTrainer(model=caft_model, mode="caft", args=args, train_dataset=_rows())
        trainer.train()
        assert caft_model.base_model.is_activation_checkpointing == checkpointing
        histories.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert histories[0] == pytest.approx(histories[1], rel=1e-5)


def test_freeze_unembedding_in_full_finetuning(tmp_path):
    caft_model = add_auxiliary_heads(make_tiny_model("llama"), CAFTConfig(num_aux_heads=1))
    prepare_full_finetuning(caft_model, freeze_unembedding=True)
    unembedding = caft_model.base_model.get_output_embeddings().weight
    before_unembedding = unembedding.detach().clone()
    before_layer = caft_model.base_model.model.layers[0].mlp.up_proj.weight.detach().clone()
    CAFTTrainer(
        model=caft_model,
        mode="caft",
        args=_args(tmp_path, max_steps=1, save_strategy="no"),
        train_dataset=_rows(),
    ).train()
    assert torch.equal(unembedding, before_unembedding)
    assert not torch.equal(caft_model.base_model.model.layers[0].mlp.up_proj.weight, before_layer)


def test_lora_never_enters_heads():
    caft_model = add_auxiliary_heads(make_tiny_model("qwen2"), CAFTConfig(num_aux_heads=2))
    apply_lora(caft_model, r=4)
    assert any("lora_" in name for name, _ in caft_model.model.named_parameters())
    assert not any("lora_" in name for name, _ in caft_model.heads.named_parameters())
    # The unembedding keeps no adapter either ("all-linear" leaves the output layer out).
    assert not any(
        "lora_" in name for name, _ in caft_model.base_model.get_output_embeddings().named_parameters()
    )


def test_heads_mode_checkpoint_holds_only_heads(tmp_path):
    trainer = CAFTTrainer(
        model=_model(), mode="heads", args=_args(tmp_path, max_steps=2), train_dataset=_rows()
    )
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "heads" / "heads.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the frozen base is not copied
