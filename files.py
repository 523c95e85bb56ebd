"""File helpers every script shares: atomic writes, sha256, the download cache.

A file written through `write_atomic` is either absent or complete at its final name, whatever
moment a crash or a full disk strikes: it is written under a temporary name beside it, flushed
to disk, then renamed. Downloads go the same way, and are checked before they are renamed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

READ_BYTES = 1 << 20
CACHE_ENV = "GPT2_TRAINER_CACHE"


class DownloadError(RuntimeError):
    """A download failed or gave the wrong content; the message says what to do instead."""


def cache_dir(*parts: str) -> Path:
    """Where downloads are kept: $GPT2_TRAINER_CACHE, else $XDG_CACHE_HOME/gpt2-trainer, else
    ~/.cache/gpt2-trainer; `parts` name a folder inside it."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-trainer"
    return Path(root, *parts)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (some filesystems refuse; the rename is atomic anyway)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write `chunks` to `path` all or nothing; return the sha256 of what was written."""
    path = Path(path)
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk stays no fuller than it was
        raise
    fsync_dir(path.parent)
    return digest.hexdigest()


def readable_as_usual(path: Path) -> None:
    """Give path the permissions a plain open() would (0666 less the umask): writers that go
    through a private temporary file (mkstemp, safetensors) leave it readable by its owner only,
    which hides checkpoints and caches from the rest of a group on a shared cluster."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, [text.encode()])


def download(url: str, dest: Path, check: Callable[[Path], None] | None = None, hint: str = "") -> Path:
    """Download `url` to `dest` through a temporary file beside it. `check(tmp)` may raise
    ValueError to refuse the content; only content that passed it is renamed to `dest`, so an
    interrupted, truncated or wrong download never leaves a file there."""
    import requests

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")  # one per caller
    tmp, out = Path(name), os.fdopen(fd, "wb")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        with requests.get(url, stream=True, timeout=60) as response:
            response.raise_for_status()
            with out as f:
                for block in response.iter_content(READ_BYTES):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        readable_as_usual(tmp)
        os.replace(tmp, dest)
    except (requests.RequestException, OSError, ValueError) as e:
        out.close()
        tmp.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url} ({type(e).__name__}: {e}).\n"
            f"HINT: {hint or f'download it on a machine with network and copy it to {dest}'}"
        ) from e
    except BaseException:  # Ctrl-C: no partial file either
        out.close()
        tmp.unlink(missing_ok=True)
        raise
    return dest


def sha256_check(expected: str) -> Callable[[Path], None]:
    """A `download` check that the file's sha256 is `expected`."""

    def check(path: Path) -> None:
        got = sha256_file(path)
        if got != expected:
            raise ValueError(f"sha256 {got}, expected {expected}: a proxy may have answered instead of the server")

    return check


def discard_output(stream=None) -> None:
    """Send a stream (stdout by default), and what is still buffered for it, to /dev/null from
    now on: its reader has gone (`| head`), and every later write, the flush at exit included,
    would fail again. A stream without a file descriptor (a test's capture) is left as it is."""
    stream = stream or sys.stdout
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
