"""Where rsnl keeps its files, and writes that survive a kill: one atomic write for every file rsnl owns,
and a lock that dies with its holder.

A file is written to a temporary name in its own folder, flushed to disk, then renamed over the old
one, so a reader (or a resumed run) sees the old content or the new, never half of it, and no
temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import os
import tempfile
import time
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


def remove_stale_temps(path) -> None:
    """Delete the temp files a killed atomic_write of `path` left; call it holding `path`'s lock, so that no
    live writer's temp file goes."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def locked(path, wait: bool = True):
    """Exclusive lock on `<path>.lock` (flock: released by the kernel when the holder dies); yields the lock
    file, open for appending (a holder may note who it is there). wait=False raises BlockingIOError when
    another process holds it. The holder deletes the lock file before releasing it, so none is left
    behind; a waiter that then wins a lock on the deleted file sees it is no longer the one at that name
    and tries again."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        lock = open(lock_path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(lock.fileno())
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except BaseException:
            lock.close()
            raise
        lock.close()  # a lock on a deleted file excludes no one
    try:
        yield lock
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
        finally:
            lock.close()  # releases the flock


# Digests of files this process has read, by the file's identity and change times. ctime is in the key
# because every write and every utime moves it and no user can set it back, so an entry is never served
# for other bytes; files changed within RACY_NS are not kept, as their ctime may not have ticked yet
# (git's "racily clean" rule).
_digests: dict[tuple, str] = {}
RACY_NS = 2_000_000_000


def file_digest(path) -> str:
    """sha256 hex of a file's bytes (read once per process for files that do not change)."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _digests.get(key)
    if digest is None:
        h = hashlib.sha256()  # sha256: with the CPU's SHA instructions faster than blake2b (~2 GB/s)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if time.time_ns() - st.st_ctime_ns > RACY_NS:
            _digests[key] = digest
    return digest
