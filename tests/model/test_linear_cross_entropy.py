import pytest
import torch
import torch.nn.functional as F

from llama2 import ModelArgs, Transformer
from llama2.model import linear_cross_entropy as lce
from llama2.model.linear_cross_entropy import linear_cross_entropy


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_ROWS", 4)  # several chunks, the last one short


def _inputs(n=11, d=6, v=13):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[2, 7]] = -100
    return hidden, weight, targets


def _reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)


def test_loss_and_gradients_equal_cross_entropy_over_the_logits_skipping_ignored_targets():
    hidden, weight, targets = _inputs()
    expected = _reference(hidden, weight, targets)
    expected.backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    loss = linear_cross_entropy(hidden, weight, targets)
    (3.0 * loss).backward()  # the incoming gradient scales both (the engine divides by accumulation steps)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, 3.0 * want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, 3.0 * want[1], rtol=1e-5, atol=1e-7)
    assert hidden.grad[[2, 7]].abs().max() == 0  # ignored positions get no gradient


def test_batched_targets_are_flattened_like_the_logits():
    hidden, weight, targets = _inputs(n=12)
    expected = _reference(hidden, weight, targets)
    loss = linear_cross_entropy(hidden.reshape(3, 4, -1), weight, targets.reshape(3, 4))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_a_frozen_weight_gets_no_gradient_and_no_grad_mode_builds_no_graph():
    hidden, weight, targets = _inputs()
    weight.requires_grad_(False)
    linear_cross_entropy(hidden, weight, targets).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _reference(hidden, weight, targets).detach(), rtol=1e-6, atol=1e-6)


def test_every_target_ignored_gives_nan_as_cross_entropy_does():
    hidden, weight, _ = _inputs()
    assert torch.isnan(linear_cross_entropy(hidden, weight, torch.full((11,), -100)))


def test_under_bf16_autocast_it_stays_within_the_heads_own_rounding():
    hidden, weight, targets = _inputs(n=40, d=32, v=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(hidden, weight, targets)
        loss = linear_cross_entropy(hidden, weight, targets)
    expected.backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)  # the same bf16 logits, summed apart
    for got, ref in zip((hidden.grad, weight.grad), want, strict=True):
        assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


def test_transformer_targets_give_the_loss_and_gradients_of_its_logits():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=32)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    keep = labels != -100
    grads = []
    for fused in (False, True):
        model = Transformer(args)
        model.init_weights(seed=0)
        if fused:
            loss = model(tokens, keep=keep, targets=labels[keep])
        else:
            loss = F.cross_entropy(model(tokens, keep=keep), labels[keep])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    for name, ref in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], ref, rtol=1e-4, atol=1e-6)
