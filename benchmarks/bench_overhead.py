"""What a study of small trials spends outside the trials: the fmnist-ablation through Ray vs its compute.

Runs a preset through `launch.main` (Ray Tune, its own log file), reads every trial's per-member
epoch_seconds, then runs the same runs in one plain Python loop in this process (no Ray, the same
trainer and feature bank), and prints:
  compute     sum over runs of the trials' own epoch_seconds (measured inside the study)
  overhead    wall x slots / compute: 1.0 would mean every slot computed all the time, from the
              command's start to its end (Ray's start, the feature task, trial launches, reports,
              checkpoints and shutdown make up the rest)
  vs plain    wall / the plain loop's wall: what the study costs against the simplest script that
              computes the same numbers (the study runs `slots` trials at once)
The stand-in and the image features come from the cache (built before the timed run if missing).

    python -m benchmarks.bench_overhead                          # fmnist-ablation, 2 CPU cores
    python -m benchmarks.bench_overhead --preset quickstart --no-plain
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(key, value)

from benchmarks.bench_common import machine_info
from benchmarks.bench_study import run_launch



def trial_compute(exp: Path) -> dict[str, float]:
    """trial folder -> sum of its members' epoch_seconds over all epochs."""
    out = {}
    for f in sorted(exp.glob("*/result.json")):
        total = 0.0
        for line in f.read_text().splitlines():
            row = json.loads(line)
            members = row.get("group") or {"single": row}
            total += sum(m["epoch_seconds"] for m in members.values())
        out[f.parent.name] = total
    return out


def plain_loop(study) -> tuple[float, int]:
    """The study's runs one after another in this process: (seconds, runs)."""
    from rsnl.inputs import load_inputs
    from rsnl.trainer import build_trainer
    configs = [cfg for point in study.grid_points() for _, cfg in study.trial_configs(point)]
    inputs = {}
    start = time.perf_counter()
    for cfg in configs:
        key = (cfg.backbone, cfg.pretrained, cfg.dataset, cfg.aug_views)
        if key not in inputs:
            inputs[key] = load_inputs(cfg)
        build_trainer(cfg, *inputs[key]).run()
    return time.perf_counter() - start, len(configs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="fmnist-ablation")
    p.add_argument("--cache", help="feature and stand-in cache (default: $RSNL_CACHE or ~/.cache/rsnl)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    args = p.parse_args(argv)
    print(machine_info("cpu"), flush=True)

    from rsnl.config import TrialConfig
    from rsnl.inputs import load_inputs, prepare_weights
    from tune.study import load_study

    sets = [f"cache_dir={args.cache}"] if args.cache else []
    study = load_study(preset=args.preset, overrides=sets)
    if study.kind != "grid":
        print("bench_overhead.py: a grid preset is needed (the plain loop runs every grid point)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    first = TrialConfig.from_dict({**study.trial})
    prepare_weights(first)
    load_inputs(first)  # fills the feature cache, so the study times its cache read only
    print(f"# stand-in and features ready in {time.perf_counter() - t0:.1f}s (cached: fast)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("RAY_TMPDIR", str(tmp / "ray"))
        cmd = ["--preset", args.preset, "--storage", str(tmp / "results"), *sum((["--set", s] for s in sets), [])]
        log = tmp / "launch.log"
        rc, wall = run_launch(cmd, log)
        text = log.read_text(errors="replace")
        if rc != 0:
            print(text[-4000:])
            return rc
        compute = trial_compute(tmp / "results" / study.name)
        driver_log = (tmp / "results" / study.name / "rsnl_driver.log").read_text(errors="replace")
    loop = re.search(r"tuning loop: ([\d.]+) s", driver_log)
    feats = re.search(r"\[rsnl\] image features: .*\(([\d.]+)s\)", text)
    slots = max(1, math.floor((os.cpu_count() or 1) / study.cpu + 1e-9))
    if study.max_concurrent:
        slots = min(slots, study.max_concurrent)
    total = sum(compute.values())
    runs = len(study.grid_points()) * len(study.group_members)
    print(f"study {study.name}: {len(compute)} trials, {runs} runs, {slots} at once; "
          f"python launch.py {' '.join(cmd[:2])}")
    print(f"  wall {wall:.1f} s (Tune's tuning loop {float(loop.group(1)) if loop else float('nan'):.1f} s, "
          f"feature task {float(feats.group(1)) if feats else float('nan'):.1f} s)")
    print("  compute per trial: " + ", ".join(f"{k.split('_', 2)[-1]} {v:.1f}s" for k, v in compute.items()))
    print(f"  compute {total:.1f} s in all -> overhead ratio (wall x {slots} slots / compute) "
          f"{wall * slots / total:.2f}; wall / compute {wall / total:.2f}")
    if loop:
        print(f"  tuning loop x {slots} / compute {float(loop.group(1)) * slots / total:.2f} "
              f"(without Ray's start, the feature task and shutdown)")
    if not args.no_plain:
        seconds, n = plain_loop(study)
        print(f"  plain loop (no Ray, {n} runs one after another, this process): {seconds:.1f} s -> "
              f"study wall / plain loop {wall / seconds:.2f}")
        print(f"ratio={wall * slots / total:.2f} plain={wall / seconds:.2f}")
    else:
        print(f"ratio={wall * slots / total:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
