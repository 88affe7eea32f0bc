"""Auxiliary heads on every supported architecture: attachment, exactness, loss and training steps."""

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from caft import CAFTConfig, CAFTTrainer, add_auxiliary_heads, apply_lora
from caft.lora import prepare_full_finetuning
from tiny_models import ARCHITECTURES, make_tiny_model, random_batch

ALL = sorted(ARCHITECTURES)


def attention_variants(arch):
    # Gemma 2 supports only eager attention. The others are checked under both implementations,
    # because a missing mask is only wrong under eager attention and sliding windows.
    return ["eager"] if arch == "gemma2" else ["sdpa", "eager"]


ARCH_AND_ATTENTION = [(arch, attn) for arch in ALL for attn in attention_variants(arch)]


@pytest.mark.parametrize("arch", ALL)
def test_heads_attach(arch):
    model = make_tiny_model(arch)
    caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=3, layers_per_head=2))
    assert len(caft_model.heads) == 3
    last_layer_class = type(caft_model.base_model.get_submodule(caft_model.parts.layers_path)[-1])
    for head in caft_model.heads:
        assert len(head.layers) == 2
        assert all(type(layer) is last_layer_class for layer in head.layers)
    # The heads are separate modules, not registered inside the base model.
    base_names = {name for name, _ in model.named_parameters()}
    assert not any(name.startswith("heads.") for name in base_names)
    assert all(parameter.requires_grad for parameter in caft_model.heads.parameters())


@pytest.mark.parametrize("arch,attn", ARCH_AND_ATTENTION)
def test_next_token_logits_equal_base(arch, attn):
    model = make_tiny_model(arch, attn_implementation=attn)
    input_ids, attention_mask, labels = random_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=2))
        output = caft_model(input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.equal(output.logits, expected.logits)
    torch.testing.assert_close(output.head_losses[0], expected.loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch,attn", ARCH_AND_ATTENTION)
def test_copied_head_reproduces_base_logits(arch, attn):
    # A head that is an exact copy of the last layer, fed the last layer's input with the model's
    # own mask and rotary embeddings, must produce the model's own logits. This checks the
    # captured call and the shared norm/unembedding/soft-cap path against the unmodified model.
    model = make_tiny_model(arch, attn_implementation=attn)
    input_ids, attention_mask, _ = random_batch()
    caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=2))
    with torch.no_grad():
        output = caft_model(input_ids, attention_mask=attention_mask, return_head_logits=True)
    real = attention_mask.bool()
    for head_logits in output.head_logits:
        torch.testing.assert_close(head_logits[real], output.logits[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ALL)
def test_resblock_heads_start_as_next_token_head(arch):
    model = make_tiny_model(arch)
    input_ids, attention_mask, _ = random_batch()
    caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=2, head_type="resblock"))
    with torch.no_grad():
        output = caft_model(input_ids, attention_mask=attention_mask, return_head_logits=True)
    for head_logits in output.head_logits:
        torch.testing.assert_close(head_logits, output.logits, rtol=1e-5, atol=1e-5)


def naive_caft_loss(next_token_logits, head_logits, labels, attention_mask, config, progress):
    """Straightforward reference: stack every head's full logits, one cross-entropy per head."""
    labels = labels.masked_fill(attention_mask == 0, -100)
    stacked = torch.stack([next_token_logits] + list(head_logits))  # (n, B, T, V)
    losses = []
    for index in range(stacked.shape[0]):
        offset = index + 1
        logits = stacked[index, :, :-offset].float()
        targets = labels[:, offset:]
        losses.append(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        )
    beta, gamma = config.heads_coefficient, config.decay
    s = config.schedule_value(progress)
    total = losses[0] + beta * s * sum(gamma ** (k - 1) * losses[k - 1] for k in range(2, len(losses) + 1))
    return total, torch.stack(losses)


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("head_type", ["transformer", "resblock"])
@pytest.mark.parametrize("return_logits", [True, False], ids=["full-logits", "chunked-next-token"])
def test_chunked_loss_matches_naive(arch, head_type, return_logits):
    config = CAFTConfig(num_aux_heads=3, head_type=head_type, heads_coefficient=0.5, loss_chunk_size=5)
    model = make_tiny_model(arch)
    caft_model = add_auxiliary_heads(model, config)
    caft_model.set_trainable(trunk=True, heads=True)
    if head_type == "resblock":  # move away from the zero initialisation so heads differ
        with torch.no_grad():
            for parameter in caft_model.heads.parameters():
                parameter.normal_(std=0.1)
    input_ids, attention_mask, labels = random_batch(batch_size=3, seq_len=14, pad_last=4)
    labels[0, :5] = -100  # a masked prompt, as in supervised fine-tuning
    progress = 0.3

    output = caft_model(
        input_ids, attention_mask=attention_mask, labels=labels, progress=progress, return_logits=return_logits
    )
    if not return_logits:  # the next-token loss came from the last layer's output, in chunks
        assert output.logits.shape[1] == 1
    output.loss.backward()
    chunked_grads = {name: p.grad.clone() for name, p in caft_model.named_parameters() if p.grad is not None}
    caft_model.zero_grad()

    reference = caft_model(
        input_ids, attention_mask=attention_mask, labels=labels, progress=progress, return_head_logits=True
    )
    naive_total, naive_losses = naive_caft_loss(
        reference.logits, reference.head_logits, labels, attention_mask, config, progress
    )
    naive_total.backward()
    naive_grads = {name: p.grad.clone() for name, p in caft_model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(output.loss, naive_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.head_losses, naive_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.head_accuracies, reference.head_accuracies)
    assert chunked_grads.keys() == naive_grads.keys()
    assert any(name.startswith("heads.") for name in chunked_grads)
    for name in naive_grads:
        torch.testing.assert_close(chunked_grads[name], naive_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_head_accuracy_matches_argmax():
    model = make_tiny_model("llama")
    caft_model = add_auxiliary_heads(model, CAFTConfig(num_aux_heads=2, loss_chunk_size=4))
    input_ids, attention_mask, labels = random_batch()
    with torch.no_grad():
        output = caft_model(input_ids, attention_mask=attention_mask, labels=labels, return_head_logits=True)
    labels = labels.masked_fill(attention_mask == 0, -100)
    all_logits = [output.logits] + output.head_logits
    for index, logits in enumerate(all_logits):
        offset = index + 1
        targets = labels[:, offset:]
        valid = targets != -100
        predictions = logits[:, :-offset].argmax(-1)
        expected = (predictions == targets)[valid].float().mean()
        torch.testing.assert_close(output.head_accuracies[index], expected)
        assert output.head_num_targets[index] == valid.sum()
        # Top-5: the target's logit is beaten by at most 4 others.
        scores = logits[:, :-offset]
        target_scores = scores.gather(-1, targets.clamp(min=0).unsqueeze(-1))
        rank = (scores > target_scores).sum(-1)
        expected_top5 = (rank < 5)[valid].float().mean()
        torch.testing.assert_close(output.head_top5_accuracies[index], expected_top5)
        assert output.head_top5_accuracies[index] >= output.head_accuracies[index]


def test_heads_mode_loss_excludes_next_token():
    config = CAFTConfig(num_aux_heads=3, decay=0.5)
    caft_model = add_auxiliary_heads(make_tiny_model("qwen2"), config)
    input_ids, attention_mask, labels = random_batch()
    with torch.no_grad():
        heads = caft_model(input_ids, attention_mask=attention_mask, labels=labels, mode="heads")
        caft = caft_model(input_ids, attention_mask=attention_mask, labels=labels, mode="caft")
    expected = sum(0.5 ** (k - 1) * heads.head_losses[k - 1] for k in range(2, 5))
    torch.testing.assert_close(heads.loss, expected)
    # In heads mode the next-token loss is still reported, from the last layer's output.
    torch.testing.assert_close(heads.head_losses, caft.head_losses, rtol=1e-5, atol=1e-6)


def test_ntp_mode_skips_heads():
    caft_model = add_auxiliary_heads(make_tiny_model("llama"), CAFTConfig(num_aux_heads=2))
    input_ids, attention_mask, labels = random_batch()
    calls = []
    caft_model.heads[0].register_forward_hook(lambda *args: calls.append(1))
    output = caft_model(input_ids, attention_mask=attention_mask, labels=labels, mode="ntp")
    assert calls == []
    assert output.loss == output.head_losses[0]
    assert torch.isnan(output.head_losses[1:]).all()


def test_left_padding_gives_no_targets_on_padding():
    # With left padding, a padded position t must not be asked to predict a real token t+k.
    caft_model = add_auxiliary_heads(make_tiny_model("llama"), CAFTConfig(num_aux_heads=2))
    input_ids, _, _ = random_batch(batch_size=1, seq_len=10, pad_last=0)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    labels = input_ids.clone()
    with torch.no_grad():
        output = caft_model(input_ids, attention_mask=attention_mask, labels=labels)
    # 6 real tokens: 5 next-token targets, 4 for t+2, 3 for t+3.
    assert output.head_num_targets.tolist() == [5, 4, 3]


# ---------------------------------------------------------------------------------------------
# One optimizer step changes exactly the parameters it should


def _train_one_step(caft_model, mode, train_heads, tmp_path):
    input_ids, attention_mask, labels = random_batch(batch_size=2, seq_len=12, pad_last=2)
    rows = [
        {"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]}
        for i in range(2)
    ]
    args = TrainingArguments(
        str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    trainer = CAFTTrainer(model=caft_model, mode=mode, train_heads=train_heads, args=args, train_dataset=rows)
    before = {name: p.detach().clone() for name, p in caft_model.named_parameters()}
    trainer.train()
    after = dict(caft_model.named_parameters())
    return {name for name in before if not torch.equal(before[name], after[name].detach())}, set(before)


STEP_CASES = [
    # mode, method, train_heads
    ("caft", "full", False),
    ("caft", "full", True),
    ("caft", "lora", False),
    ("caft", "lora", True),
    ("ntp", "full", False),
    ("ntp", "lora", False),
    ("heads", "full", False),
    ("heads", "lora", False),
]


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("mode,method,train_heads", STEP_CASES)
def test_training_step_changes_expected_parameters(arch, mode, method, train_heads, tmp_path):
    caft_model = add_auxiliary_heads(make_tiny_model(arch), CAFTConfig(num_aux_heads=2))
    if method == "lora":
        apply_lora(caft_model, r=4, alpha=8, dropout=0.0)
        # PEFT initialises LoRA B to zero, so A gets no gradient in the first step; a nonzero B
        # makes every adapter matrix move.
        with torch.no_grad():
            for name, parameter in caft_model.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.02)
    else:
        prepare_full_finetuning(caft_model)

    changed, names = _train_one_step(caft_model, mode, train_heads, tmp_path)
    head_names = {name for name in names if name.startswith("heads.")}
    lora_names = {name for name in names if "lora_" in name}
    base_names = names - head_names - lora_names

    if mode == "heads":
        expected = head_names
    else:
        trunk = lora_names if method == "lora" else base_names
        expected = trunk | (head_names if (mode == "caft" and train_heads) else set())
    assert changed <= expected, f"unexpected changes: {sorted(changed - expected)[:5]}"
    # Every trainable tensor moved (embedding tables move in the rows of the batch's tokens).
    missed = expected - changed
    assert not missed, f"trainable but unchanged: {sorted(missed)[:5]}"


@pytest.mark.parametrize("arch", ALL)
def test_random_init_redraws_weights(arch):
    caft_model = add_auxiliary_heads(make_tiny_model(arch), CAFTConfig(num_aux_heads=1, head_init="random"))
    last_layer = caft_model.base_model.get_submodule(caft_model.parts.layers_path)[-1]
    head_layer = caft_model.heads[0].layers[0]
    for (name, original), (_, copy) in zip(last_layer.named_parameters(), head_layer.named_parameters()):
        if original.dim() == 2:  # weight matrices; norms and biases start from constants anyway
            assert not torch.equal(original, copy), name
    input_ids, attention_mask, _ = random_batch()
    with torch.no_grad():
        output = caft_model(input_ids, attention_mask=attention_mask, return_head_logits=True)
    assert not torch.allclose(output.head_logits[0], output.logits)


@pytest.mark.parametrize("return_logits", [True, False])
def test_training_forward_saves_no_full_logits(return_logits):
    # What backward keeps: with return_logits=False (the trainer's call) no saved tensor contains the
    # logits of more than one chunk; with the full logits returned, the next-token loss keeps them.
    config = CAFTConfig(num_aux_heads=2, loss_chunk_size=4)
    caft_model = add_auxiliary_heads(make_tiny_model("llama"), config)
    caft_model.set_trainable(trunk=True, heads=False)
    input_ids, attention_mask, labels = random_batch(batch_size=3, seq_len=14, pad_last=2)
    vocab = caft_model.config.vocab_size
    weights = {parameter.untyped_storage().data_ptr() for parameter in caft_model.parameters()}
    logits_rows = []  # rows of every saved activation whose last dimension is the vocabulary

    def pack(tensor):
        is_weight = tensor.untyped_storage().data_ptr() in weights  # e.g. the transposed unembedding
        if tensor.dim() >= 2 and tensor.shape[-1] == vocab and not is_weight:
            logits_rows.append(tensor.numel() // vocab)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = caft_model(input_ids, attention_mask=attention_mask, labels=labels, return_logits=return_logits)
    output.loss.backward()
    batch_size, length = input_ids.shape
    if return_logits:
        assert max(logits_rows) >= batch_size * (length - 1)
    else:
        assert max(logits_rows, default=0) <= config.loss_chunk_size
