"""Output layer and cross-entropy in one step, a chunk of positions at a time.

The plain path, `F.cross_entropy(x @ W.T, targets)`, holds a (positions x vocabulary) logits
tensor, and under autocast an fp32 copy of it and its gradient as well: at GPT-2's 50,304
columns that is 6.6 GB for 16 x 1024 tokens in fp32 alone, more than the whole 124M model
and its optimizer. Here the logits of one chunk of rows exist at a time. The gradient of the
loss with respect to a chunk's logits is known as soon as they are (softmax minus one-hot),
so the forward pass turns it straight into the gradients of the hidden states and of W and
keeps those (the size of x and of W) for the backward pass. FLOPs are the same as the plain
path's: three matmuls with W, no recomputation.

Numerics: logits and softmax in fp32; the matmuls in the autocast dtype when autocast is on
(as the plain path's would be); W's gradient summed over chunks in fp32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_ROWS = 4096  # a 4096 x 50,304 fp32 chunk of logits is 0.8 GB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk_rows: int):
        device_type = x.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            valid = targets != -1  # -1 marks positions that do not count, as ignore_index=-1 does
            # ignored rows gather column 0 and are masked out; any other id outside the vocabulary
            # stays out of range, so indexing fails as it does in F.cross_entropy
            safe_targets = torch.where(valid, targets, 0)
            loss_sum = torch.zeros((), device=x.device, dtype=acc_dtype)
            grad_x = torch.empty_like(x)
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc_dtype)
            for start in range(0, x.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                xc = x[rows].to(compute_dtype)
                logits = (xc @ w.t()).to(acc_dtype)
                if logits.size(1) > vocab_size:
                    logits[:, vocab_size:] = float("-inf")  # padded ids are not tokens
                lse = torch.logsumexp(logits, dim=1)
                target_logit = logits.gather(1, safe_targets[rows, None]).squeeze(1)
                chunk_valid = valid[rows]
                loss_sum += torch.where(chunk_valid, lse - target_logit, 0.0).sum()
                # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows
                grad_logits = torch.exp_(logits.sub_(lse[:, None]))
                grad_logits.scatter_add_(1, safe_targets[rows, None], torch.full_like(lse[:, None], -1.0))
                grad_logits.mul_(chunk_valid[:, None])
                grad_logits = grad_logits.to(compute_dtype)
                grad_x[rows] = (grad_logits @ w).to(grad_x.dtype)
                grad_w += grad_logits.t() @ xc
            n_valid = valid.sum()
        ctx.save_for_backward(grad_x, grad_w, n_valid)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        return (grad_x * scale).to(grad_x.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` (x: (N, C), weight: (V_padded, C)) against
    targets (N,), ignoring targets of -1 and the columns from vocab_size on; the same value and
    gradients as F.cross_entropy on the full logits, which are never held at once."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    vocab_size = weight.size(0) if vocab_size is None else vocab_size
    return _LinearCrossEntropy.apply(x, weight, targets, vocab_size, chunk_rows)
