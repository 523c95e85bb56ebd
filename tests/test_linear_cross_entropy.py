import pytest
import torch
import torch.nn.functional as F

from conftest import requires_gpu
from linear_cross_entropy import linear_cross_entropy


def plain_loss(x, w, targets, vocab_size):
    logits = x @ w.t()
    logits = torch.cat([logits[:, :vocab_size], torch.full_like(logits[:, vocab_size:], float("-inf"))], dim=1)
    return F.cross_entropy(logits, targets, ignore_index=-1)


def inputs(n=37, c=16, padded=72, vocab=67, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, dtype=dtype, generator=g).to(device).requires_grad_()
    w = torch.randn(padded, c, dtype=dtype, generator=g).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:5]] = -1  # ignored positions
    return x, w, targets.to(device), vocab


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 1000])
def test_loss_and_gradients_equal_plain_cross_entropy(chunk_rows):
    x, w, targets, vocab = inputs(seed=chunk_rows)
    fused = linear_cross_entropy(x, w, targets, vocab, chunk_rows)
    # a scaled loss, as gradient accumulation makes, must scale the gradients too
    fused_grads = torch.autograd.grad(fused * 0.25, (x, w))
    plain = plain_loss(x, w, targets, vocab)
    plain_grads = torch.autograd.grad(plain * 0.25, (x, w))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_padded_columns_get_no_gradient():
    x, w, targets, vocab = inputs()
    linear_cross_entropy(x, w, targets, vocab, 8).backward()
    assert w.grad[vocab:].abs().max().item() == 0.0
    assert w.grad[:vocab].abs().max().item() > 0.0


def test_bf16_autocast_stays_close_to_the_plain_path():
    x, w, targets, vocab = inputs(n=256, c=64, padded=512, vocab=500, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(x, w, targets, vocab, 64)
        fused_grads = torch.autograd.grad(fused, (x, w))
    reference = plain_loss(x.double(), w.double(), targets, vocab)
    reference_grads = torch.autograd.grad(reference, (x, w))
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(reference.item(), rel=1e-2)
    for got, ref in zip(fused_grads, reference_grads):
        assert got.dtype == torch.float32  # gradients come back in the parameters' dtype
        assert ((got.double() - ref).norm() / ref.norm()).item() < 2e-2


def test_full_logits_are_never_saved_for_backward():
    """What autograd keeps is the size of x and W, not of (positions x vocabulary)."""
    x, w, targets, vocab = inputs(n=64, c=8, padded=512, vocab=500, dtype=torch.float32)
    full = x.size(0) * w.size(0)

    def largest_saved(loss_fn) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss_fn()
        return max(sizes)

    assert largest_saved(lambda: plain_loss(x, w, targets, vocab)) >= full  # the check can fail
    assert largest_saved(lambda: linear_cross_entropy(x, w, targets, vocab, 16)) <= w.numel()


def test_bad_chunk_size_is_rejected():
    x, w, targets, vocab = inputs()
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(x, w, targets, vocab, 0)


@requires_gpu
def test_bf16_on_gpu_matches_fp64_reference():
    x, w, targets, vocab = inputs(n=4096, c=256, padded=50304, vocab=50257, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = linear_cross_entropy(x, w, targets, vocab, 1000)
        fused_grads = torch.autograd.grad(fused, (x, w))
    reference = plain_loss(x.double(), w.double(), targets, vocab)
    reference_grads = torch.autograd.grad(reference, (x, w))
    assert fused.item() == pytest.approx(reference.item(), rel=1e-2)
    for got, ref in zip(fused_grads, reference_grads):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 2e-2
