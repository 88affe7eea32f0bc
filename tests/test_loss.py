"""Chunked cross-entropy against torch's plain cross-entropy, and the memory it keeps for backward."""

import pytest
import torch
import torch.nn.functional as F

from caft.loss import chunked_cross_entropy, shift_targets


def _problem(n_rows=37, hidden=16, vocab=53, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(n_rows, hidden, generator=generator).to(dtype).requires_grad_(True)
    unembedding = torch.nn.Linear(hidden, vocab, bias=True).to(dtype)
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)
    targets[::4] = -100
    return states, unembedding, targets


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 1000])
def test_matches_plain_cross_entropy(chunk_size):
    states, unembedding, targets = _problem()
    result = chunked_cross_entropy(states, targets, unembedding, chunk_size=chunk_size)
    result.mean_loss().backward()
    grads = (states.grad.clone(), unembedding.weight.grad.clone(), unembedding.bias.grad.clone())
    states.grad = None
    unembedding.zero_grad()

    logits = unembedding(states)
    expected = F.cross_entropy(logits, targets, ignore_index=-100)
    expected.backward()

    torch.testing.assert_close(result.mean_loss(), expected)
    for actual, reference in zip(grads, (states.grad, unembedding.weight.grad, unembedding.bias.grad)):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-7)
    valid = targets != -100
    assert result.num_targets == valid.sum()
    assert result.num_correct == (logits.argmax(-1) == targets)[valid].sum()


def test_bf16_states_upcast_per_chunk():
    states, unembedding, targets = _problem(dtype=torch.bfloat16)
    result = chunked_cross_entropy(states, targets, unembedding, chunk_size=8)
    expected = F.cross_entropy(unembedding(states).float(), targets, ignore_index=-100)
    assert result.loss_sum.dtype == torch.float32
    torch.testing.assert_close(result.mean_loss(), expected, rtol=1e-4, atol=1e-4)


def test_no_targets_gives_zero_and_backward_works():
    states, unembedding, targets = _problem()
    result = chunked_cross_entropy(states, torch.full_like(targets, -100), unembedding, chunk_size=8)
    assert result.mean_loss().item() == 0.0
    assert torch.isnan(result.accuracy())
    result.mean_loss().backward()
    assert torch.count_nonzero(states.grad) == 0


def test_backward_keeps_no_full_logits():
    # Bytes saved for backward by the chunked loss stay near one chunk of logits, while the naive
    # loss saves the whole (N, V) logits.
    n_rows, vocab, chunk = 512, 2048, 64
    states, unembedding, targets = _problem(n_rows=n_rows, hidden=32, vocab=vocab)

    def saved_bytes(function):
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            function()
        return sum(sizes)

    naive = saved_bytes(lambda: F.cross_entropy(unembedding(states), targets))
    chunked = saved_bytes(
        lambda: chunked_cross_entropy(states, targets, unembedding, chunk_size=chunk).mean_loss()
    )
    full_logits = n_rows * vocab * 4
    assert naive >= full_logits
    assert chunked < full_logits / 4


def test_shift_targets_masks_padding_at_both_ends():
    labels = torch.tensor([[10, 11, 12, 13, 14]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1]])
    assert shift_targets(labels, 2).tolist() == [[12, 13, 14, -100, -100]]
    # Position 0 is padding: it predicts nothing, although label 12 is real.
    assert shift_targets(labels, 2, attention_mask).tolist() == [[-100, 13, 14, -100, -100]]
    assert shift_targets(labels, 9).tolist() == [[-100] * 5]
