"""Throughput of a small study through launch.py (Ray Tune), and Ray's per-trial overhead.

Runs `launch.main` on a grid study of equal-cost trials (digits + rsnl-tiny, one trial per seed) with a
fraction of a CPU or GPU per trial, then reads the trials' result.json files:
  trials per hour  trials / wall time of the whole command (Ray start, feature task, Tune, shutdown)
  start            per trial: its first iteration's time minus its first epoch's compute
                   (process or actor reuse, features from the object store, model and trainer build)
  report           per epoch: time between two reports minus the epoch's own compute
                   (checkpoint written to a temporary folder, tune.report persisting it to storage)
  launch           per trial: the tuning loop's slot time not spent inside trials,
                   (loop x concurrent slots - sum of trial spans) / trials: worker process start,
                   imports, scheduling and Tune's bookkeeping
  fixed            per study: the feature task, Ray's start, the Tuner's setup and Ray's shutdown
                   (wall time minus Tune's tuning loop)
Ray's and Tune's own output goes to a log file (its tail is printed when the study fails).

    python -m benchmarks.bench_study                              # 4 trials, 0.5 CPU each (2 CPU cores)
    python -m benchmarks.bench_study --device cuda --gpus-per-trial 0.25 --trials 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(key, value)

import yaml

from benchmarks.bench_common import machine_info, median



def study_yaml(args, storage: Path, cache: Path) -> dict:
    return {
        "name": "bench-study",
        "description": "benchmarks/bench_study.py: equal-cost trials, one per seed",
        "storage": str(storage),
        "trial": {"dataset": "digits", "backbone": "rsnl-tiny", "pretrained": None, "shots": args.shots,
                  "noise_type": "ptnl", "noise_rate": 0.5, "epochs": args.epochs, "n_ctx": 4, "blocks": args.blocks,
                  "aug_views": 2, "device": args.device, "cache_dir": str(cache)},
        "search": {"kind": "grid", "params": {"seed": {"grid": list(range(1, args.trials + 1))}}},
        "objective": {"metric": "val_acc", "mode": "max"},
        "resources": {"cpu": 1, "gpu": 0},
        "reuse_actors": True,
    }


def read_trials(exp: Path) -> list[list[dict]]:
    trials = []
    for f in sorted(exp.glob("*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(rows)
    return trials


def run_launch(cmd: list[str], log: Path) -> tuple[int, float]:
    """launch.main(cmd) with all output in `log`, Ray shut down after: (exit code, wall seconds)."""
    import launch
    t0 = time.perf_counter()
    with output_to(log):
        try:
            rc = launch.main(cmd)
        finally:
            import ray
            ray.shutdown()  # leave no Ray processes behind
    return rc, time.perf_counter() - t0


@contextmanager
def output_to(path: Path):
    """Both file descriptors 1 and 2 into `path`: Ray's processes and loggers write there directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def analyse(trials: list[list[dict]], wall: float, loop: float | None, features: float | None,
            slots: int) -> list[str]:
    n = len(trials)
    starts, reports, compute = [], [], []
    spans = [rows[-1]["time_total_s"] for rows in trials]
    for rows in trials:
        first = rows[0]
        starts.append(first["time_this_iter_s"] - first["epoch_seconds"])
        reports += [r["time_this_iter_s"] - r["epoch_seconds"] for r in rows[1:]]
        compute.append(sum(r["epoch_seconds"] for r in rows))
    epochs = len(trials[0]) if trials else 0
    lines = [f"trials: {n} finished x {epochs} epochs; wall {wall:.1f} s -> {3600 * n / wall:.0f} trials/hour overall"]
    if loop:
        lines[-1] += f"; Tune's tuning loop {loop:.1f} s -> {3600 * n / loop:.0f} trials/hour in steady state"
    launch_s = (loop * min(slots, n) - sum(spans)) / n if loop and n else float("nan")
    lines += [
        f"per trial (medians): compute {median(compute):.2f} s (sum of epoch_seconds); Ray overhead: start "
        f"{median(starts):.2f} s, report + checkpoint {median(reports) * 1000:.0f} ms per epoch "
        f"({median(reports) * max(epochs - 1, 0):.2f} s per trial), launch {launch_s:.2f} s "
        f"({min(slots, n)} trials at once)",
    ]
    if loop:
        feat = f"feature task {features:.1f} s, " if features is not None else ""
        rest = wall - loop - (features or 0.0)
        lines.append(f"per study (fixed): {feat}Ray start + Tuner setup + shutdown {rest:.1f} s")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="default: 0.5 on CPU, 1 with GPUs")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--storage", help="experiment folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else (1.0 if args.gpus_per_trial > 0 else 0.5)
    print(machine_info(args.device), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        storage = Path(args.storage) if args.storage else tmp / "results"
        os.environ.setdefault("RAY_TMPDIR", str(tmp / "ray"))
        config = tmp / "bench-study.yaml"
        config.write_text(yaml.safe_dump(study_yaml(args, storage, tmp / "cache"), sort_keys=False))
        cmd = ["--config", str(config), "--cpus-per-trial", str(cpus), "--gpus-per-trial", str(args.gpus_per_trial),
               "--storage", str(storage)]
        print(f"# python launch.py {' '.join(cmd)}  ({args.trials} trials x {args.epochs} epochs, digits + rsnl-tiny, "
              f"blocks {args.blocks}, {cpus:g} CPU + {args.gpus_per_trial:g} GPU per trial)", flush=True)
        log_path = tmp / "launch.log"
        rc, wall = run_launch(cmd, log_path)
        log = log_path.read_text(errors="replace")
        print("\n".join(line for line in log.splitlines() if line.startswith("[rsnl]")), flush=True)
        if rc != 0:
            print(log[-4000:])
            print(f"launch.py returned {rc}", file=sys.stderr)
            return rc
        loop = re.search(r"Total run time: [\d.]+ seconds \(([\d.]+) seconds for the tuning loop\)", log)
        feats = re.search(r"\[rsnl\] image features: .*\(([\d.]+)s\)", log)
        trials = read_trials(storage / "bench-study")
        if args.gpus_per_trial > 0:
            import torch
            slots = int(torch.cuda.device_count() / args.gpus_per_trial + 1e-9)
        else:
            slots = int(os.cpu_count() / cpus + 1e-9)
        print("\n".join(analyse(trials, wall, float(loop.group(1)) if loop else None,
                                float(feats.group(1)) if feats else None, max(slots, 1))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
