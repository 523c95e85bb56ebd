"""Fully sharded data parallel training (train.py --fsdp) with PyTorch's FSDP2 `fully_shard`.

Each transformer block, and then the whole GPT (embeddings, which are also the output layer,
and the final LayerNorm), is sharded over all ranks: every rank keeps 1/W of the fp32 weights,
of their gradients and of AdamW's state. A block's weights are gathered in the compute dtype
just before it runs and freed after it; gradients are reduced in fp32 and scattered back to
their shards. Here also: building the model without any rank holding all of it, checkpoints
through torch.distributed.checkpoint (DCP, each rank writes its own shards), and exporting a
sharded checkpoint as one Hugging Face folder:

    python sharding.py export runs/NAME exported/NAME    # config.json + one model.safetensors
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, GPTConfig
from runtime import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, ConfigError, run_command

# ---- the process group and the wrapping ----


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group, also for one process (a benchmark, a one-GPU run): a group of
    one, without any network address, where torchrun has not started one."""
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--fsdp runs on CUDA GPUs or on CPUs, not on {device.type}: use --device cuda or cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard(model: GPT, amp: torch.dtype | None, device: torch.device) -> None:
    """fully_shard each block, then the root, over all ranks. Weights are gathered in the autocast
    dtype (bf16 on GPUs) and gradients reduced in fp32, into fp32 shards that AdamW updates."""
    # the mesh's device is the run's: left to FSDP, it would be any accelerator present
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    # GPT returns its logits as a view (the padded vocabulary cut off); no caller writes to them
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGPT\) returned a view tensor")
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root's weights (the token table is also the output layer) are the first the backward
    # pass needs: left gathered between forward and backward instead of gathered twice.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Whether the next backward pass reduce-scatters the gradients. FSDP reads the switch in
    the backward pass itself, so it is set, not scoped: a context around the forward pass alone
    (as DDP's no_sync) would be undone before the backward pass runs."""
    getattr(model, "_orig_mod", model).set_requires_gradient_sync(enabled)


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also over sharded gradients: the norm of each rank's
    shards is summed over ranks into the norm of the whole gradient, a plain tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


# ---- building a sharded model: never the whole model on any rank ----


@dataclass
class InitOp:
    """One in-place initialisation op that GPT.__init__ ran on a tensor."""

    func: torch._ops.OpOverload
    tensor: torch.Tensor  # the meta tensor it wrote to
    args: tuple
    kwargs: dict


_FILLS = {torch.ops.aten.fill_, torch.ops.aten.zero_}
_RANDOM = {torch.ops.aten.uniform_, torch.ops.aten.normal_}


class InitRecorder(TorchDispatchMode):
    """Records, in order, the in-place ops that initialise a model built on the meta device.
    Any other in-place op is an error: replaying the record could not reproduce it."""

    def __init__(self):
        super().__init__()
        self.ops: list[InitOp] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _FILLS | _RANDOM:
            if kwargs.get("generator") is not None:
                raise NotImplementedError(f"{func} with its own generator: sharding.py cannot replay it")
            self.ops.append(InitOp(func, args[0], args[1:], kwargs))
        elif func._schema.is_mutable:
            raise NotImplementedError(f"the model's initialisation uses {func}, which sharding.py cannot replay")
        return func(*args, **kwargs)


def build_sharded_model(config: GPTConfig, device: torch.device, amp: torch.dtype | None, init: bool = True) -> GPT:
    """GPT(config), sharded over all ranks, with each rank's shards on `device`: built on the meta
    device, sharded, then only the local shards allocated. With init, they are given exactly the
    values GPT(config) on the CPU gives them after the same torch.manual_seed, and the CPU
    generator is left in the same state (init=False: for weights loaded next)."""
    ensure_process_group(device)
    with torch.device("meta"), InitRecorder() as recorder:
        model = GPT(config)
    # tied weights are one tensor: whichever name the ops reach it by, the same shard is written
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    ops = [(names.get(id(op.tensor)), op) for op in recorder.ops]  # None: a tensor tying dropped
    shard(model, amp, device)
    model.to_empty(device=device)
    if init:
        replay_init(model, ops)
    return model


def local_rows(param: DTensor) -> tuple[torch.Tensor, int]:
    """(this rank's shard flattened, its offset in the flattened full tensor). fully_shard splits
    dim 0 as torch.chunk does: ceil(rows / W) rows per rank, fewer or none on the last ranks."""
    local = param.to_local()
    rows = param.shape[0]
    per_rank = -(-rows // param.device_mesh.size())
    first = min(param.device_mesh.get_local_rank() * per_rank, rows)
    if local.shape[0] != min(per_rank, rows - first):
        raise RuntimeError(f"unexpected shard of {tuple(param.shape)}: {tuple(local.shape)} rows from {first}")
    return local.view(-1), first * (param.numel() // rows if rows else 0)


@torch.no_grad()
def replay_init(model: GPT, ops: list[tuple[str | None, InitOp]], chunk: int = 1 << 22) -> None:
    """Run the recorded initialisation again on the local shards. A random op draws the whole
    tensor's values from the CPU generator as GPT(config) did, a chunk at a time, and keeps the
    part that falls in this rank's shard: the same numbers in the same order, so the generator
    ends where the unsharded initialisation leaves it. Every rank draws everything once, as
    building the unsharded model would; none holds more than a chunk of it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    initialised = set()
    for name, op in ops:
        shard_flat, offset = local_rows(params[name]) if name is not None else (None, 0)
        if op.func.overloadpacket in _RANDOM:
            draw_and_keep(op, shard_flat, offset, chunk)
        elif shard_flat is not None:
            op.func(shard_flat, *op.args, **op.kwargs)
        if name is not None:
            initialised.add(id(params[name]))
    missing = [name for name, p in model.named_parameters() if id(p) not in initialised]
    if missing:
        raise RuntimeError(f"no initialisation recorded for {missing}: sharding.py cannot set them")


def draw_and_keep(op: InitOp, keep: torch.Tensor | None, offset: int, chunk: int) -> None:
    """Draw op's values for its whole tensor a chunk at a time, copying into keep the part that
    covers [offset, offset + keep.numel()). The CPU generator fills a normal_ 16 values at a
    time, redrawing the last 16 when the size is not a multiple of 16: chunks of a multiple of
    16 with a last one of at least 16 values draw exactly what one call on the tensor draws."""
    numel = op.tensor.numel()
    bounds = [*range(0, numel, chunk), numel]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 16:
        del bounds[-2]
    buffer = torch.empty(min(numel, chunk + 16), dtype=op.tensor.dtype)
    lo, hi = offset, offset + (keep.numel() if keep is not None else 0)
    for start, end in zip(bounds, bounds[1:], strict=False):
        piece = buffer[: end - start]
        op.func(piece, *op.args, **op.kwargs)
        a, b = max(start, lo), min(end, hi)
        if a < b:
            keep[a - lo : b - lo].copy_(piece[a - start : b - start])


def build_from_rank0(load: Callable[[], GPT], device: torch.device, amp: torch.dtype | None) -> GPT:
    """A sharded GPT holding the weights that load() returns on rank 0 (on its CPU): the other
    ranks receive their shards from it, tensor by tensor. An error loading them is raised on
    every rank alike."""
    ensure_process_group(device)
    full, error = None, None
    if dist.get_rank() == 0:
        try:
            full = load()
        except Exception as e:  # raised below, on every rank
            error = e
    message = [(full.config if full is not None else None, error)]
    dist.broadcast_object_list(message, src=0)
    config, error = message[0]
    if error is not None:
        raise error
    model = build_sharded_model(config, device, amp, init=False)
    weights = full.state_dict() if full is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    return model


# ---- checkpoints ----


class ShardedState:
    """The weights and AdamW's state of a sharded run, as checkpoint.Checkpointer saves and
    restores them: through DCP, every rank writing and reading its own shards. Loading into
    another number of ranks reshards them."""

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
        }

    def save(self, directory: Path) -> None:
        dcp.save(self.state_dict(), checkpoint_id=directory)

    def load(self, directory: Path) -> None:
        state = self.state_dict()
        dcp.load(state, checkpoint_id=directory)
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


# ---- memory per rank ----


def per_rank_bytes(config: GPTConfig, world_size: int, compute_bytes: int = 2) -> dict[str, int]:
    """What one rank of world_size holds: `state`, its fp32 weights, gradients and AdamW's two
    moments (16 bytes an element; the largest share, dim 0 split as fully_shard splits it),
    against `unsharded`, one whole copy of those; and `gathered`, an estimate of the whole
    weights and gradients in flight: the root's (gathered from the forward pass to the end of
    the backward pass) and two blocks' (the one running and the next), in the compute dtype of
    compute_bytes, with the gradients also in fp32 for their reduce-scatter."""
    with torch.device("meta"):
        model = GPT(config)
    local = full = 0
    for p in model.parameters():
        rows = p.shape[0]
        local += -(-rows // world_size) * (p.numel() // rows)
        full += p.numel()
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    root = full - config.n_layer * block
    grad_bytes = compute_bytes + (4 if compute_bytes != 4 else 0)
    gathered = (root + 2 * block) * (compute_bytes + grad_bytes)
    return {"state": 16 * local, "unsharded": 16 * full, "gathered": gathered}


# ---- export ----


def main(argv: list[str] | None = None) -> int:
    from checkpoint import CheckpointError, load_model, saved_tokenizer
    from model import check_export_dir

    parser = argparse.ArgumentParser(prog="python sharding.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="write a checkpoint (sharded or not) as a Hugging Face folder: config.json + model.safetensors"
    )
    export.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest usable checkpoint)")
    export.add_argument("out", help="the folder to write: new, empty, or an earlier export to overwrite")
    args = parser.parse_args(argv)
    try:
        check_export_dir(Path(args.out))  # before loading weights that may be gigabytes
        model = load_model(args.checkpoint)
        out = model.export_hf(args.out, tokenizer=saved_tokenizer(args.checkpoint))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"exported {args.checkpoint} to {out}: load it with --init-from {out} (train.py, sample.py) or hellaswag.py --model-type {out}"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_command(main))
