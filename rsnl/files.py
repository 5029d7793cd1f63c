"""Where rsnl keeps its files, and writes that survive a kill: one atomic write for every file rsnl owns,
and a lock that dies with its holder.

A file is written to a temporary name in its own folder, flushed to disk, then renamed over the old
one, so a reader (or a resumed run) sees the old content or the new, never half of it, and no
temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
from pathlib import Path
from typing import Callable


def default_cache_dir() -> Path:
    """Features, the stand-in VLM and downloaded data: $RSNL_CACHE, else ~/.cache/rsnl."""
    return Path(os.environ.get("RSNL_CACHE") or Path.home() / ".cache" / "rsnl")


def probe_writable(folder) -> None:
    """Create `folder` if needed and write, then delete, one small file in it; OSError when that fails.
    A real write, not os.access: permission bits do not stop root, and say nothing of read-only mounts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".rsnl-probe.", suffix=".tmp")
    try:
        os.write(fd, b"rsnl")
    finally:
        os.close(fd)
        os.unlink(tmp)


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_weights_path(value: str) -> bool:
    """A `pretrained` value that names a file (rather than a tag such as openai or fashion-mnist)."""
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).is_file()


def atomic_write(path, content: bytes | str | Callable[[io.BufferedWriter], None]) -> Path:
    """Replace `path` with `content` (bytes, text, or a function that writes to a binary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here: closed whatever happens below
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would make shared caches unreadable
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself reaches the disk with the folder
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def locked(path):
    """Exclusive lock on `<path>.lock` (flock: released by the kernel when the holder dies)."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
