"""What every entry script shares at run time: ranks and the process group, the device,
autocast, the attention kernel, peak FLOPs for MFU, and printing on rank 0 only.

train.py, hellaswag.py, sample.py and the benchmarks import this; it imports nothing of the
project, so no script needs another script to run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from files import discard_output

# Exit codes shared by every script: a user's mistake is 2, anything else that stops a run is 1.
EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2
# A reader that went away (`| head`) and Ctrl-C: what a shell reports for a process killed by
# SIGPIPE (13) or SIGINT (2), 128 + the signal, so `set -o pipefail` scripts see the usual codes.
EXIT_BROKEN_PIPE, EXIT_INTERRUPTED = 128 + 13, 128 + 2

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default after its help (where it has
    one the help does not already spell out)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default in (None, "", argparse.SUPPRESS) or "default" in help or not action.option_strings:
            return help
        if action.nargs == 0 and action.default is False:  # a switch: off unless given
            return help
        return help + " (default: %(default)s)"


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (torchrun sets RANK), flushed so that logs interleave in order."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    try:
        print(*args, **kwargs, flush=True)
    except BrokenPipeError:
        # whatever read the output has gone (`train.py | head`, a closed `less`): the run goes
        # on, its output discarded, rather than dying with its work since the last checkpoint
        discard_output(kwargs.get("file"))


def run_command(main: Callable[[], int]) -> int:
    """main()'s exit code, for a script's `sys.exit(run_command(main))`: a closed stdout
    (`python sample.py | head -1`) ends it quietly, Ctrl-C with one line instead of a traceback."""
    try:
        code = main()
        sys.stdout.flush()  # here, where a reader that has gone is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        discard_output()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        try:
            print("interrupted", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # stderr gone too: the exit code still says it
        return EXIT_INTERRUPTED


class PeerStopped(Exception):
    """Another rank stopped the run and said why; this one stops without repeating it."""


def peer_gone(e: BaseException) -> bool:
    """Whether e is a collective that failed because another process of the run went away
    (it stopped on an error of its own, which it reports)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def out_of_memory(e: BaseException) -> str | None:
    """The first line of an allocation failure's message (CUDA, MPS or the CPU allocator), or
    None for any other error. (CPU and MPS allocators raise a plain RuntimeError.)"""
    text = str(e).strip()
    oom = isinstance(e, torch.OutOfMemoryError)
    oom = oom or isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
    return (text.splitlines()[0] if text else type(e).__name__) if oom else None


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
        return self._max([int(flag)])[0] > 0

    def same(self, value: int) -> bool:
        """Whether every rank holds the same value; a collective, every rank calls it."""
        largest, negated_smallest = self._max([value, -value])
        return largest == -negated_smallest

    def _max(self, values: list[int]) -> list[int]:
        if not self.enabled:
            return values
        on_gpu = dist.get_backend() == "nccl"
        t = torch.tensor(values, dtype=torch.long, device=torch.cuda.current_device() if on_gpu else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


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
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_when_agent_dies()
    if d.enabled:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_min)
        options = {"device_id": device} if backend == "nccl" else {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store: see attempt_store
            store = attempt_store(agent_store(timeout), d.rank, d.world_size)
            options.update(store=store, rank=d.rank, world_size=d.world_size)
        dist.init_process_group(backend=backend, timeout=timeout, **options)
    return d, device


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- living under torchrun ----

# The store key through which the workers of one torchrun attempt agree on its name.
ATTEMPT_QUEUE = "gpt2_trainer/attempts"
# How long workers whose torchrun died get to stop on their own before they exit regardless:
# what torchrun itself gives its workers between its SIGTERM and its SIGKILL.
AGENT_GONE_GRACE_S = 30.0


def agent_store(timeout: datetime.timedelta) -> dist.Store:
    """A client of the store that the torchrun agent hosts (MASTER_ADDR:MASTER_PORT)."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    return store


def attempt_store(store: dist.Store, rank: int, world_size: int) -> dist.Store:
    """The part of torchrun's store that only the workers of this attempt use.

    The agent's store outlives its workers: after a restart it still holds what the failed
    attempt's process group wrote there (gloo's listening addresses, NCCL's ids), and a new
    worker that reads a peer's key before the peer rewrites it connects to a dead process. The
    environment does not name the attempt (TORCHELASTIC_RESTART_COUNT counts one node's
    restarts, not the rendezvous rounds every node shares), so rank 0 names it with a random id
    and hands it to each rank under a key that rank chose at random, which no earlier attempt
    can have written. Rank 0 answers every request in the queue, earlier attempts' included,
    and stops when every rank has confirmed that it holds this attempt's id.
    """
    if rank == 0:
        attempt, confirmed = uuid.uuid4().hex, 0
        while confirmed < world_size - 1:
            kind, _, value = store.queue_pop(ATTEMPT_QUEUE).decode().partition(":")
            if kind == "ask":
                store.set(f"{ATTEMPT_QUEUE}/{value}", attempt)
            elif value == attempt:
                confirmed += 1
    else:
        ticket = uuid.uuid4().hex
        store.queue_push(ATTEMPT_QUEUE, f"ask:{ticket}")
        attempt = store.get(f"{ATTEMPT_QUEUE}/{ticket}").decode()
        store.queue_push(ATTEMPT_QUEUE, f"have:{attempt}")
    return dist.PrefixStore(f"attempt/{attempt}", store)


def stop_when_agent_dies(grace_s: float = AGENT_GONE_GRACE_S, poll_s: float = 1.0) -> threading.Thread:
    """Stops this worker when its parent, the torchrun agent, is gone: a worker nobody supervises
    would train on alone, and a restart of the job would find it still writing to the run.

    The worker gets SIGTERM, as if torchrun had stopped it (train.py saves a checkpoint at the
    next step boundary and exits 75); one that has not exited after grace_s exits with
    EXIT_ERROR, which loses no saved checkpoint since checkpoints are published atomically.
    """
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:  # an orphan's parent becomes init (or a subreaper)
            time.sleep(poll_s)
        _warn(f"torchrun (pid {agent}) is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        _warn(f"still running {grace_s:g}s after SIGTERM; exiting")
        os._exit(EXIT_ERROR)

    thread = threading.Thread(target=watch, name="stop-when-agent-dies", daemon=True)
    thread.start()
    return thread


def _warn(message: str) -> None:
    """A line on stderr that cannot fail: whoever read it (torchrun's log pipe) may be gone."""
    try:
        print(f"[rank {os.environ.get('RANK', 0)}] {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


# ---- precision and attention ----


def host_values(t: torch.Tensor) -> Callable[[], list]:
    """A function that returns t's values on the host, waiting only for the work queued before
    this call. On a GPU the copy goes to page-locked memory and an event marks its end, so work
    queued after this call keeps the device busy while the host reads."""
    if t.device.type != "cuda":
        values = t.tolist()
        return lambda: values
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # (the allocator keeps it cached)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list:
        copied.synchronize()
        return host.tolist()

    return read


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
