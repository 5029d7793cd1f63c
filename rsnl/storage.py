"""Where a study's results live: a local folder or a URI (s3://, gs://, ...), read and written alike.

A URI may carry options after '?' (s3://bucket/studies?endpoint_override=host:9000&scheme=http); a
path below it goes before the query, never after. pyarrow (which Ray brings) talks to the remote
stores; it is imported on use, so reading a local study needs nothing beyond the standard library.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def is_uri(location: str) -> bool:
    return "://" in str(location)


def absolute(location: str) -> str:
    """A local folder made absolute (from the current directory, ~ expanded); a URI as it is."""
    location = str(location)
    return location if is_uri(location) else str(Path(os.path.expanduser(location)).resolve())


def join(location: str, *parts: str) -> str:
    """`location/part/...`, keeping a URI's query string at the end."""
    base, sep, query = str(location).partition("?")
    path = "/".join([base.rstrip("/"), *parts])
    return f"{path}?{query}" if sep else path


def filesystem(location: str):
    """(pyarrow FileSystem, path inside it) of a local folder or a URI."""
    import pyarrow.fs
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), absolute(location)
    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    return fs, path


def exists(location: str) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """Atomic on both: a local file through rsnl.files.atomic_write; an object store replaces an object
    whole by nature."""
    if not is_uri(location):
        from rsnl.files import atomic_write
        atomic_write(location, data)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def mirror_dir(location: str, kind: str) -> Path:
    """A local folder for a copy of what lives at a URI (one per location and purpose)."""
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"rsnl-{kind}" / digest


def download(location: str, local_dir, skip=lambda name: False) -> Path:
    """Copy the folder at `location` to `local_dir` (files whose relative path `skip` names are left out,
    e.g. checkpoints)."""
    import pyarrow.fs

    from rsnl.files import atomic_write
    fs, root = filesystem(location)
    local = Path(local_dir)
    info = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    for item in info:
        if item.type != pyarrow.fs.FileType.File:
            continue
        rel = item.path[len(root.rstrip("/")) + 1:]
        if skip(rel):
            continue
        with fs.open_input_stream(item.path) as f:
            atomic_write(local / rel, f.read())
    return local
