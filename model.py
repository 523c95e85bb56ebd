"""GPT-2 in one file: config, blocks, init, sampling, and Hugging Face import/export.

This module knows nothing of files' layout on disk beyond the Hugging Face format (and enough
of a run folder's to refuse one in from_pretrained), nor of ranks or schedules: it can be
imported into a notebook and used alone.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from linear_cross_entropy import DEFAULT_CHUNK_ROWS, linear_cross_entropy

# ---- configuration ----


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position table covers
    vocab_size: int = 50257  # real tokens; logits for ids >= vocab_size are never used
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm layers
    pad_vocab_to: int = 1  # round the embedding table up to a multiple of this (64: 50257 -> 50304)

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pad_vocab_to"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, dict] = {
    # The four OpenAI GPT-2 sizes (parameter counts with the tied head counted once).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small enough to train for a few minutes on a laptop CPU.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


def config_from_preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ---- the network ----


class LayerCache:
    """One layer's keys and values (B, heads, tokens so far, head size), for sampling."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.size(2)

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys and values; all of them so far, these included."""
        if self.keys is not None:
            if k.size(2) != 1:
                # a causal mask between several new tokens and the old ones is not written: the
                # prompt goes in first, then one token at a time
                raise ValueError("a cache that holds tokens takes one new token at a time")
            k, v = torch.cat((self.keys, k), dim=2), torch.cat((self.values, v), dim=2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """The keys and values of every token seen so far, layer by layer: with it, sampling runs
    the model on each new token alone instead of on the whole context again."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    def __len__(self) -> int:
        return len(self.layers[0])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # one matmul for q, k and v of every head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale_init = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.extend(k, v)
        # SDPA picks flash / memory-efficient / cuDNN kernels where the device has them. Causal
        # among the tokens given; one token after cached ones attends to all of them.
        causal = T > 1
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 used the tanh approximation of GELU; exact GELU would change pretrained outputs
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2. Two training-time settings live on the module, not in GPTConfig, because they
    change memory and speed but never the function computed (checkpoints and exports ignore them):

    activation_checkpointing: N > 0 recomputes every Nth block's activations in the backward
        pass instead of storing them (1: every block): those blocks run their forward pass
        twice, for most of their activation memory; meant for models that do not fit otherwise.
    fused_loss: compute the output layer and the cross-entropy a chunk of positions at a time
        (linear_cross_entropy.py), so the full (B, T, vocabulary) logits are never held; the
        training forward then returns None for logits.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = 0
        self.fused_loss = False
        self.fused_loss_chunk_rows = DEFAULT_CHUNK_ROWS
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying: the output projection is the token embedding (saves 38M params at 124M)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale_init", False):
                # each block adds to the residual stream twice (attn and mlp), so scale the
                # projections into it by 1/sqrt(2 * n_layer) to keep its variance from growing
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss). With a cache (sampling), idx continues the
        tokens the cache holds and their keys and values are added to it.

        With targets: logits for every position (B, T, V) and the cross-entropy loss, a scalar
        for reduction="mean" or per token (B, T) for reduction="none"; targets of -1 are
        ignored. Without targets: logits of the last position only (B, 1, V), which is all
        sampling needs and skips the largest matmul for the other T - 1 positions.
        V is the real vocabulary: padded ids are cut off, so they can never be sampled.
        With fused_loss set, a mean loss that needs gradients comes with logits None.
        """
        return self.logits_and_loss(self.hidden_states(idx, cache), targets, reduction)

    # The forward pass in two halves, so that a training script can compile each block and the
    # output half apart (train.py's --compile-scope blocks).

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> the last block's output (B, T, C); with a cache, idx are the
        positions after the ones it holds."""
        B, T = idx.shape
        start = len(cache) if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        recompute = self.activation_checkpointing if self.training and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.transformer.h):
            if recompute and i % recompute == 0:
                x = checkpoint(block, x, use_reentrant=False)  # keeps the RNG state: same dropout
            elif cache is not None:
                x = block(x, cache.layers[i])
            else:
                x = block(x)
        return x

    def logits_and_loss(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The last block's output (B, T, C) -> (logits, loss), as forward() returns them."""
        B, T, _ = x.shape
        x = self.transformer.ln_f(x)
        V = self.config.vocab_size
        if targets is None:
            return self.lm_head(x[:, [-1], :])[..., :V], None
        if self.fused_loss and reduction == "mean" and torch.is_grad_enabled():
            flat = x.view(B * T, -1)
            loss = linear_cross_entropy(flat, self.lm_head.weight, targets.reshape(-1), V, self.fused_loss_chunk_rows)
            return None, loss
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != V:
            # padded ids are not tokens: keep them out of the softmax so they never get probability
            logits[..., V:] = float("-inf")
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )
        if reduction == "none":
            loss = loss.view(B, T)
        return logits[..., :V], loss

    # ---- accounting ----

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, the tied head counted once. non_embedding=True leaves out the position
        table (and counts the token table, which is also the output layer), as is usual for
        scaling laws and for FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12·L·H·Q·T.

        6N: forward (2N) and backward (4N) matmul FLOPs of the N non-embedding parameters
        (the tied token table is counted because it is the output layer's matmul).
        12·L·H·Q·T: attention scores and weighted sum (QK^T and AV, 2 matmuls of 2·T·Q FLOPs
        each per head and layer, times 3 for forward and backward), H heads of size Q.
        For GPT-2 124M at T=1024 this is 0.855 GFLOP/token (a padded vocabulary adds 0.03%).
        """
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * head_dim * seq_len

    # ---- optimisation ----

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float] = (0.9, 0.95),
        device_type: str = "cpu",
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> torch.optim.AdamW:
        """AdamW with decay on matrices and embeddings (>= 2-D) only; biases and LayerNorm
        gains are left alone, as decaying them only hurts. fused=None: the fused kernel on CUDA
        and CPU, PyTorch's per-tensor loop elsewhere."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if fused is None:  # several times faster than the per-tensor loop, on CPUs too
            fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)

    # ---- sampling ----

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T). Reproducible with a seeded generator
        (on the model's device). temperature 0 means greedy.

        Each token is predicted from the last block_size tokens. A cache of their keys and
        values lets each step run the model on the newest token alone; once the sequence is
        longer than block_size, the window slides and each step starts a cache afresh.
        use_cache=False runs the whole window every step (the same computation, slower)."""
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None or len(cache) == block_size:
                cache = KVCache(self.config.n_layer)
                logits, _ = self(idx[:, -block_size:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:  # None or 0: no limit
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    # ---- Hugging Face import and export ----

    # HF's GPT-2 uses Conv1D layers, whose weights are stored transposed relative to nn.Linear
    _HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_path: str, pad_vocab_to: int = 1, dropout: float = 0.0) -> GPT:
        """OpenAI GPT-2 weights ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") from the
        Hugging Face hub, or a local directory saved with `save_pretrained` / `export_hf`."""
        from transformers import GPT2Config, GPT2LMHeadModel

        _check_not_our_folder(name_or_path)  # which transformers would misread
        hc = GPT2Config.from_pretrained(name_or_path)
        _check_hf_config(hc, name_or_path)  # before loading weights that may be gigabytes
        hf = GPT2LMHeadModel.from_pretrained(name_or_path, config=hc)
        config = GPTConfig(
            block_size=hc.n_positions,
            vocab_size=hc.vocab_size,
            n_layer=hc.n_layer,
            n_head=hc.n_head,
            n_embd=hc.n_embd,
            dropout=dropout,
            bias=True,
            pad_vocab_to=pad_vocab_to,
        )
        model = cls(config)
        model.load_hf_state_dict(hf.state_dict())
        return model

    def load_hf_state_dict(self, hf_sd: dict[str, torch.Tensor]) -> None:
        sd = self.state_dict()
        V = self.config.vocab_size
        hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        ours = [k for k in sd if k != "lm_head.weight"]  # tied to wte
        head = hf_sd.get("lm_head.weight")
        if head is not None and not torch.equal(head, hf_sd.get("transformer.wte.weight", head)):
            raise ValueError("lm_head.weight differs from transformer.wte.weight: this model ties them")
        missing = [k for k in ours if k not in hf_sd]
        if missing:
            raise ValueError(f"Hugging Face state dict lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for k in ours:
                src = hf_sd[k]
                if k.endswith(self._HF_TRANSPOSED):
                    src = src.t()
                if k == "transformer.wte.weight":
                    sd[k][:V].copy_(src)
                    sd[k][V:].zero_()  # padded rows: never an input, masked out as outputs
                elif sd[k].shape != src.shape:
                    raise ValueError(f"{k}: shape {tuple(src.shape)} in the file, {tuple(sd[k].shape)} in the model")
                else:
                    sd[k].copy_(src)

    def export_hf(self, out_dir: str | Path, tokenizer: str | None = None) -> Path:
        """Write config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained` loads, into
        a new or empty folder or over an earlier export (see check_export_dir). Padded vocabulary
        rows are dropped. tokenizer, the name the model was trained with, goes into config.json
        as HF_TOKENIZER_KEY."""
        from transformers import GPT2Config, GPT2LMHeadModel

        from files import readable_as_usual

        out = Path(out_dir)
        check_export_dir(out)
        cfg = self.config
        if not cfg.bias:
            raise ValueError("Hugging Face GPT-2 has biases everywhere; a bias=False model cannot be exported")
        hc = GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            # GPT-2's end-of-text id, where the vocabulary is GPT-2's
            bos_token_id=50256 if cfg.vocab_size > 50256 else None,
            eos_token_id=50256 if cfg.vocab_size > 50256 else None,
            **({HF_TOKENIZER_KEY: tokenizer} if tokenizer else {}),
        )
        hf = GPT2LMHeadModel(hc)
        hf_sd = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue
            v = v.detach().float().cpu()
            if k == "transformer.wte.weight":
                v = v[: cfg.vocab_size]
            if k.endswith(self._HF_TRANSPOSED):
                v = v.t()
            hf_sd[k] = v.contiguous()
        result = hf.load_state_dict(hf_sd, strict=False)
        unexpected_missing = [k for k in result.missing_keys if k != "lm_head.weight" and not k.endswith("attn.bias")]
        if unexpected_missing or result.unexpected_keys:
            raise RuntimeError(f"export mismatch: missing {unexpected_missing}, unexpected {result.unexpected_keys}")
        hf.tie_weights()
        hf.save_pretrained(out, safe_serialization=True)
        (out / "gpt2_trainer_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        for path in out.iterdir():
            if _is_export_file(path.name):
                readable_as_usual(path)  # safetensors writes its file for its owner alone
        return out


# ---- Hugging Face export folders ----

# The key of the exported config.json that names the tokenizer the model was trained with
HF_TOKENIZER_KEY = "gpt2_trainer_tokenizer"
# What export_hf writes (save_pretrained splits weights above its shard size into numbered files)
_EXPORT_FILES = ("config.json", "generation_config.json", "gpt2_trainer_config.json", "model.safetensors")
_EXPORT_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors|model\.safetensors\.index\.json")


def _is_export_file(name: str) -> bool:
    return name in _EXPORT_FILES or _EXPORT_SHARD.fullmatch(name) is not None


def check_export_dir(out: Path) -> None:
    """Raise FileExistsError unless out is new, empty, or holds only what export_hf writes (an
    earlier export, overwritten in place): an export replaces config.json, which in a run
    folder is the training configuration, and would mix its weights with other files."""
    hint = "HINT: choose an empty or new folder, for example exported/NAME"
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder to export into. {hint}")
    if not out.is_dir():
        return
    if (out / "checkpoints").exists() or (out / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{out} is a run folder (it has checkpoints/ or metrics.jsonl): an export would replace "
            f"the run's config.json and put its weights beside the checkpoints. {hint}"
        )
    others = sorted(p.name for p in out.iterdir() if not _is_export_file(p.name))
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(
            f"{out} holds files an export does not write ({listed}); only a new or empty folder or an "
            f"earlier export (config.json, model.safetensors and the like alone) is written into. {hint}"
        )


# ---- compiling ----

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("model", "blocks")


def compile_model(model: GPT, mode: str = "default", scope: str = "model", dynamic: bool | None = None) -> nn.Module:
    """The module to train with. Scope model: one graph for the whole forward pass, a wrapper
    around the module. Scope blocks: each transformer block and the output half
    (GPT.logits_and_loss) are compiled in place and the module itself is returned. The blocks are
    alike, so after the first one they reuse its compiled code, and compile time grows far less
    with depth; what it gives up is fusion across block boundaries (a residual add with the next
    LayerNorm). dynamic: torch.compile's (None: static shapes until a second shape is seen, True:
    one graph for every shape from the start)."""
    options = {"mode": None if mode == "default" else mode, "dynamic": dynamic}
    if scope == "model":
        return torch.compile(model, **options)
    for block in model.transformer.h:
        block.compile(**options)
    model.logits_and_loss = torch.compile(model.logits_and_loss, **options)
    return model


def uncompiled():
    """Runs compiled code eagerly inside it: generation grows the sequence by one token per call,
    and would otherwise recompile the blocks that scope blocks compiled in place."""
    return torch.compiler.set_stance("force_eager")


def _check_not_our_folder(name: str) -> None:
    """Refuse this project's run and checkpoint folders. They are no Hugging Face folders, though
    they look alike (a config.json, a model.safetensors): transformers reads a run's config.json,
    the training configuration, as a GPT2Config and fails on its fields, and in a checkpoint
    folder, which has no config.json, loads the weights into a default-sized GPT-2."""
    path = Path(name)
    if (path / "meta.json").is_file() and not (path / "config.json").exists():
        what = "a checkpoint folder"
    elif (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        what = "a run folder"
    else:
        return
    if what == "a run folder" and not any((path / "checkpoints").glob("step_*")):
        hint = "it has saved no checkpoint yet; load it once it has (train.py --checkpoint-every)"
    else:
        hint = (
            f"load it with checkpoint.load_pretrained({name!r}), or --init-from {name} in sample.py and "
            f"train.py, --checkpoint {name} in hellaswag.py"
        )
    raise ValueError(f"{name} is {what} of this trainer, not a Hugging Face model folder. HINT: {hint}")


def _check_hf_config(hc, name: str) -> None:
    """Refuse Hugging Face GPT-2 variants this model does not implement, which would otherwise
    load without error and compute something else."""
    expected = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": (1e-5,),
        "tie_word_embeddings": (True,),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
        "n_inner": (None, 4 * hc.n_embd),
    }
    wrong = [
        f"{key}={getattr(hc, key)!r} (GPT-2: {' or '.join(repr(v) for v in allowed)})"
        for key, allowed in expected.items()
        if hasattr(hc, key) and getattr(hc, key) not in allowed
    ]
    if wrong:
        raise ValueError(f"{name} is not a GPT-2 this model can load: {'; '.join(wrong)}")


# ---- command line: there is nothing to run here, only what to run instead ----

USAGE = """GPT-2 in one file, to import rather than run. What to run instead:

    python sample.py --init-from RUN_OR_MODEL --prompt "..."   # text from a run, a checkpoint or gpt2
    python sharding.py export RUN OUT                           # a checkpoint as a Hugging Face folder
    python train.py --model tiny                                # train one

and from Python:

    from model import GPT, config_from_preset
    model = GPT(config_from_preset("tiny"))     # presets: {presets}
    model = GPT.from_pretrained("gpt2")         # or a Hugging Face folder; checkpoint.load_pretrained
                                                # also takes our run and checkpoint folders
    model.export_hf("exported/")
"""


def main(argv: list[str] | None = None) -> int:
    from runtime import EXIT_OK

    parser = argparse.ArgumentParser(
        prog="python model.py",
        description=USAGE.format(presets=", ".join(PRESETS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)  # --help; any other argument is refused with exit status 2
    parser.print_help()
    return EXIT_OK


if __name__ == "__main__":
    from runtime import run_command

    sys.exit(run_command(main))
