"""What every entry script shares at run time: ranks and the process group, the device,
autocast, the attention kernel, peak FLOPs for MFU, and printing on rank 0 only.

train.py, hellaswag.py, sample.py and the benchmarks import this; it imports nothing of the
project, so no script needs another script to run.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Exit codes shared by every script: a user's mistake is 2, anything else that stops a run is 1.
EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2

ATTENTION_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}

# Peak dense bf16 tensor-core FLOP/s by device name, for MFU; devices not listed get no MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


class ConfigError(ValueError):
    """A flag or a combination of flags that cannot work; the message says which and what to do."""


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (torchrun sets RANK), flushed so that logs interleave in order."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# ---- processes and devices ----


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether flag is true on some rank; a collective, every rank calls it."""
        if not self.enabled:
            return flag
        on_gpu = dist.get_backend() == "nccl"
        count = torch.tensor([int(flag)], device=torch.cuda.current_device() if on_gpu else "cpu")
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        return count.item() > 0


def best_device() -> str:
    """CUDA, then MPS, then CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto, cpu, mps, cuda or cuda:N -> the device, or a ConfigError naming what is missing."""
    name = best_device() if name == "auto" else name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}, but torch sees no CUDA GPU; use --device cpu (or auto)")
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}, but torch sees {torch.cuda.device_count()} GPU(s)")
        return device
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps, but this machine has no usable MPS device; use --device cpu (or auto)")
    if name not in ("cpu", "mps"):
        raise ConfigError(f"--device {name!r}: use auto, cpu, mps, cuda or cuda:N")
    return torch.device(name)


def setup_distributed(device_name: str, timeout_min: float = 10.0) -> tuple[Dist, torch.device]:
    """Ranks from torchrun's environment (one process without it), the device to use, and the
    process group when there are several ranks."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    device = resolve_device(device_name, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # what stays in fp32 outside autocast (optimizer maths, fp32 runs) may use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if d.enabled:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_min),
            **({"device_id": device} if backend == "nccl" else {}),
        )
    return d, device


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


# ---- precision and attention ----


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --dtype auto/bf16/fp16/fp32, or None for plain fp32."""
    if name == "auto":
        # (without emulation: pre-Ampere GPUs would run bf16 emulated, slower than fp32)
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return None  # CPU and MPS: fp32 is the safe and usually the faster default
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--dtype fp16 needs CUDA (it relies on a CUDA grad scaler); use bf16 or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def autocast_context(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp) if amp is not None else nullcontext()


def attention_context(name: str):
    """Restricts scaled_dot_product_attention to one kernel (compilation included, which reads the
    same switches); auto lets PyTorch choose among all of them, also inside a restricted region."""
    return sdpa_kernel(list(ATTENTION_BACKENDS.values()) if name == "auto" else [ATTENTION_BACKENDS[name]])


def check_attention_backend(
    name: str, device: torch.device, amp: torch.dtype | None, n_head: int, head_dim: int, dropout: float
) -> None:
    """Run the chosen kernel once, forward and backward, at the model's head size, dtype and
    dropout, so that a kernel this device or build lacks is a clear error before any training."""
    if name == "auto":
        return
    dtype = amp or torch.float32
    q = torch.randn(1, n_head, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with attention_context(name):
            F.scaled_dot_product_attention(q, q, q, dropout_p=dropout, is_causal=True).sum().backward()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"--attention {name}: this kernel does not run on {device} in {str(dtype).replace('torch.', '')} "
            f"with head size {head_dim}{f' and dropout {dropout}' if dropout else ''} ({reason}); "
            "use --attention auto"
        ) from e
