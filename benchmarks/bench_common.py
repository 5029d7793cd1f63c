"""Shared pieces of the benchmarks: machine info, timing, peak memory, DTD-shaped generated data.

Benchmarks import it as `benchmarks.bench_common` (they run as modules from the repository root).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# DTD's 47 classes in the order of CoOp's split JSON (labels 0..46).
DTD_CLASSES = (
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous "
    "flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted "
    "meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled "
    "stained stratified striped studded swirly veined waffled woven wrinkled zigzagged"
).split()
assert len(DTD_CLASSES) == 47

# Images per class per split of the generated DTD-shaped tree. DTD has 60/40/40 (train/val/test); the
# few-shot sample takes 16 per class from train, ptnl noise at 50 % borrows 8 more per class from other
# classes' unused images, so 24 per class is enough. Val: 4 shots (val_shots=4); test: 4 per class.
DTD_COUNTS = {"train": 24, "val": 8, "test": 4}


def machine_info(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines = [f"# machine: {cpu}, {os.cpu_count()} CPUs, load average {load}",
             f"# python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
             f"device {device}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        lines.append(f"# gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    lines.append(f"# date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, command: {' '.join([sys.executable] + sys.argv)}")
    return "\n".join(lines)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, *args, device="cpu"):
    """(seconds, result) of fn(*args), synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t0, out


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def fmt_times(xs) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc), so that a phase's RSS starts from live memory."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory during a `with` block: CUDA max_memory_allocated on a GPU, else the peak resident set
    size of this process (sampled every 5 ms from /proc/self/statm) and its rise over the block's start
    (freed memory is handed back to the OS first, so the rise is the block's own working memory)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak = self.start = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self.start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        return False

    def describe(self) -> str:
        gib = 2 ** 30
        if self.device.type == "cuda":
            return f"peak CUDA allocated {self.peak / gib:.2f} GiB"
        return f"peak RSS {self.peak / gib:.2f} GiB (+{(self.peak - self.start) / gib:.2f} GiB during it)"


def make_dtd_tree(root, classes=DTD_CLASSES, counts=None, size: int = 64) -> Path:
    """A CoOp-layout DTD of generated images under root (the data_root); skipped when already there."""
    from rsnl.testing import make_coop_tree
    counts = counts or DTD_COUNTS
    root = Path(root)
    marker = root / f".generated-{len(classes)}-{counts['train']}-{counts['val']}-{counts['test']}-{size}"
    if not marker.exists():
        make_coop_tree(root, classes, counts, dataset="dtd", size=size)
        marker.write_text("made by benchmarks/bench_common.py\n")
    return root


@contextmanager
def quiet_open_clip():
    """open_clip logs a warning for every random-init model; the benchmarks say random init themselves."""
    import logging
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
