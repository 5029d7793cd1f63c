"""Members per second: a trial's group trained side by side (rsnl/members.py) against one member at a
time (batch_members: false), side by side in one run.

Workloads (members = the first K of a group's members, in the study's order):
  testbed  Fashion-MNIST + the stand-in rsnl-tiny (pretrained fashion-mnist), the fmnist-ablation
           preset's trial settings; its 12 members are noise {0, 12.5, 25, 50} % x seeds {1, 2, 3}.
           One method (--variant, default rsnl-m4) for every group size, and every preset method at
           --each-method-at members.
  dtd      DTD-shaped: 47 classes (DTD's names), 16 shots, batch 32, n_ctx 16, RN50 random init,
           bench_trial's generated DTD tree and synthetic feature bank (the epoch's compute does not
           depend on the features' values), --dtd-blocks blocks, the robust filter; members noise
           {0, 12.5, 25, 50} % x seeds 1, 2, 3.
How: for each group, two sets of fresh trainers train --epochs epochs, one set one at a time (each epoch,
member after member, as a trial with batch_members: false), the other side by side
(rsnl.members.train_side_by_side); the modes alternate epoch by epoch (which goes first too), so that
both see the same load on a shared machine; --repeats rounds, the median counts. members/s = K / (seconds
for the epochs x 50 / epochs): 50-epoch members per second. Every round also compares the two modes'
members (context and every metric, epoch_seconds aside): whether side by side changes a member's
numbers. Memory (dtd): the peak of one side-by-side training step against rsnl.members.step_bytes'
estimate. --procs N runs N such processes at once (N trials sharing the device, e.g. 4 at 0.25 GPU);
their members/s add up.

    python -m benchmarks.bench_members                        # test-bed and DTD-shaped on the CPU
    python -m benchmarks.bench_members --workload dtd --device cuda --groups 1 12 --procs 4
    python -m benchmarks.bench_members --smoke                # digits + random-init rsnl-tiny (CI)

The last line is `ratio=<side by side / one at a time, members per second>` of the test-bed's group of 6
(without the test-bed: of the last group).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from benchmarks.bench_common import DTD_CLASSES, PeakMemory, machine_info, make_dtd_tree, median, quiet_open_clip
from rsnl.config import TrialConfig
from rsnl.members import stacked_text_features, step_bytes, step_together, train_side_by_side
from rsnl.trainer import build_trainer

PROTOCOL_EPOCHS = 50
NOISE_SEEDS = [(r, s) for r in (0.0, 0.125, 0.25, 0.5) for s in (1, 2, 3)]


def testbed_members(args, variant: str):
    from rsnl.inputs import load_inputs
    from tune.study import load_study
    study = load_study(preset="fmnist-ablation", overrides=["download=false", f"device={args.device}"])
    variants = {v["name"]: v for v in study.variants}
    configs = [c for _, c in study.trial_configs({"variant": variants[variant]})]
    return configs, *load_inputs(configs[0])


def dtd_members(args, root):
    from benchmarks.bench_trial import feature_dim, synthetic_bank
    from rsnl.data import load_dataset
    from rsnl.models import load_clip
    base = TrialConfig(dataset="dtd", data_root=str(root), backbone=args.dtd_backbone, pretrained=None, shots=16,
                       val_shots=4, noise_type="ptnl", blocks=args.dtd_blocks, n_ctx=16, batch_size=32,
                       aug_views=args.dtd_views, device=args.device)
    with quiet_open_clip():
        clip = load_clip(base.backbone, None, torch.device(args.device))
    ds = load_dataset("dtd", str(root))
    bank = synthetic_bank(ds, clip.identity, feature_dim(clip.model), base.aug_views)
    return [base.replace(noise_rate=r, seed=s) for r, s in NOISE_SEEDS], clip, bank


def smoke_members(args):
    from rsnl.data import load_dataset
    from rsnl.features import build_feature_bank
    from rsnl.models import load_clip
    cache = tempfile.mkdtemp(prefix="rsnl-bench-members-")
    base = TrialConfig(dataset="digits", backbone="rsnl-tiny", pretrained=None, shots=4, n_ctx=4, blocks=2,
                       batch_size=8, aug_views=1, device="cpu", cache_dir=cache)
    clip = load_clip("rsnl-tiny", None)
    bank = build_feature_bank(load_dataset("digits"), clip.model, clip.preprocess, clip.identity, aug_views=1,
                              cache_dir=cache, tokenizer=clip.tokenizer)
    return [base.replace(noise_rate=r, seed=s) for r, s in NOISE_SEEDS], clip, bank


def one_epoch(trainers, side_by_side: bool, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    if side_by_side:
        train_side_by_side(trainers)
    else:
        for t in trainers:
            t.train_epoch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def differences(alone, together) -> tuple[float, float]:
    """Largest |difference| of a member's context and of its metrics (epoch_seconds aside) between modes."""
    ctx = max((a.prompts.ctx - b.prompts.ctx).abs().max().item() for a, b in zip(alone, together))
    metric = 0.0
    for a, b in zip(alone, together):
        for ma, mb in zip(a.history, b.history):
            for k, v in ma.items():
                if k != "epoch_seconds" and not (math.isnan(v) and math.isnan(mb[k])):
                    metric = max(metric, abs(v - mb[k]))
    return ctx, metric


def time_group(configs, clip, bank, epochs: int, repeats: int, device, barrier=None) -> dict:
    """Seconds of `epochs` epochs of the group, one at a time and side by side (median of the rounds),
    and the modes' largest differences. The modes alternate epoch by epoch (which goes first too), so
    that both see the same load on a shared machine."""
    seconds = {False: [], True: []}
    diffs = []
    for r in range(repeats):
        built = {mode: [build_trainer(c.replace(epochs=epochs), clip, bank) for c in configs] for mode in (False, True)}
        total = {False: 0.0, True: 0.0}
        for e in range(epochs):
            for mode in ((False, True) if (r + e) % 2 == 0 else (True, False)):
                if barrier is not None:
                    barrier.wait()
                total[mode] += one_epoch(built[mode], mode, device)
        for mode in total:
            seconds[mode].append(total[mode])
        diffs.append(differences(built[False], built[True]))
    return {"alone": median(seconds[False]), "together": median(seconds[True]), "runs": seconds,
            "ctx_diff": max(d[0] for d in diffs), "metric_diff": max(d[1] for d in diffs)}


def step_memory(configs, clip, bank, device) -> tuple[str, int]:
    """Peak memory of one side-by-side training step (every member active) and the estimate."""
    trainers = [build_trainer(c, clip, bank) for c in configs]
    with torch.no_grad():
        texts = stacked_text_features([t.prompts for t in trainers])
    runs = [t.begin_epoch(x) for t, x in zip(trainers, texts)]
    estimate = step_bytes(trainers[0]) * len(trainers)
    with PeakMemory(device) as mem:
        step_together([(t, r, r.batches[0]) for t, r in zip(trainers, runs)])
    return mem.describe(), estimate


def per_s(k: int, seconds: float, epochs: int) -> float:
    return k / (seconds * PROTOCOL_EPOCHS / epochs)


def report(label: str, k: int, t: dict, epochs: int) -> tuple[str, float]:
    alone, together = per_s(k, t["alone"], epochs), per_s(k, t["together"], epochs)
    exact = ("bit-identical" if t["ctx_diff"] == 0 and t["metric_diff"] == 0 else
             f"max |ctx diff| {t['ctx_diff']:.2g}, max |metric diff| {t['metric_diff']:.2g}")
    runs = " ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(t["runs"][False], t["runs"][True]))
    return (f"  {label:<22} group {k:>2}: one at a time {alone:#7.3g} members/s, side by side {together:#7.3g} "
            f"members/s, ratio {together / alone:5.2f}x  [s per {epochs} epochs, alone/together: {runs}; "
            f"{exact}; load {os.getloadavg()[0]:.1f}]"), together / alone


def run(args, barrier=None, out=None) -> float | None:
    """The whole measurement in this process, and its ratio; with `out` (a queue) results go there, not to
    stdout."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    say = print if out is None else (lambda *a, **k: None)
    results = []
    workloads = ["smoke"] if args.smoke else (["testbed", "dtd"] if args.workload == "both" else [args.workload])
    with tempfile.TemporaryDirectory() as tmp:
        for workload in workloads:
            if workload == "dtd":
                root = make_dtd_tree(Path(args.workdir or tmp) / "data", DTD_CLASSES, size=64)
                configs, clip, bank = dtd_members(args, root)
                plan = [(f"dtd m={args.dtd_blocks} gmm", k) for k in args.groups]
                epochs = args.dtd_epochs
                say(f"\n== DTD-shaped: {args.dtd_backbone} random init, 47 classes x 16 shots, blocks "
                    f"{args.dtd_blocks}, {args.dtd_views} views; {epochs} epoch(s) per timing ==", flush=True)
            else:
                epochs = args.epochs
                if workload == "smoke":
                    configs, clip, bank = smoke_members(args)
                    plan = [("smoke", k) for k in args.groups]
                else:
                    plan = [(args.variant, k) for k in args.groups]
                    if args.each_method_at:
                        plan += [(v, args.each_method_at) for v in METHODS if v != args.variant]
                    say(f"\n== test-bed: fashion-mnist + rsnl-tiny/fashion-mnist, fmnist-ablation's trial; "
                        f"{epochs} epochs per timing ==", flush=True)
            loaded, warm = {}, set()
            for label, k in plan:
                if workload == "testbed":
                    if label not in loaded:
                        loaded[label] = testbed_members(args, label)
                    configs, clip, bank = loaded[label]
                if (workload, label) not in warm:  # untimed: first-call costs (imports, allocator, scikit-learn)
                    time_group(configs[:2], clip, bank, 1, 1, device)
                    warm.add((workload, label))
                t = time_group(configs[:k], clip, bank, epochs, args.repeats, device, barrier)
                line, ratio = report(label, k, t, epochs)
                say(line, flush=True)
                results.append((workload, label, k, t, epochs))
                if workload == "testbed" and label == args.variant and k == 6:
                    results.append(("ratio", ratio))
            if workload == "dtd" and args.memory:
                for k in args.groups:
                    mem, estimate = step_memory(configs[:k], clip, bank, device)
                    say(f"  memory, one side-by-side step of {k:>2} members: {mem}; estimate "
                        f"(rsnl.members.step_bytes x {k}) {estimate / 2**30:.2f} GiB", flush=True)
    if out is not None:
        out.put([r for r in results if r[0] != "ratio"])
        return None
    ratios = [r[1] for r in results if r[0] == "ratio"]  # the test-bed's group of 6, else the last group
    return ratios[0] if ratios else results[-1][3]["alone"] / results[-1][3]["together"]


METHODS = ("coop", "gce", "rsnl-m1", "rsnl-m2", "rsnl-m4", "rsnl-m6", "nlprompt")


def run_procs(args) -> float:
    """--procs N: N processes (trials sharing the device) measure at once, each step of both modes
    started together; their members per second add up."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.procs), ctx.Queue()
    procs = [ctx.Process(target=run, args=(args, barrier, out)) for _ in range(args.procs)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    print(f"\n== {args.procs} processes at once (each a trial with 1/{args.procs} of the device) ==")
    ratios = []
    for i, (workload, label, k, _, epochs) in enumerate(results[0]):
        alone = sum(per_s(k, r[i][3]["alone"], epochs) for r in results)
        together = sum(per_s(k, r[i][3]["together"], epochs) for r in results)
        diff = max(r[i][3]["ctx_diff"] for r in results)
        print(f"  {workload} {label:<18} group {k:>2}: one at a time {alone:#7.3g} members/s, side by side "
              f"{together:#7.3g} members/s, ratio {together / alone:5.2f}x (all {args.procs} processes; "
              f"max |ctx diff| {diff:.2g})", flush=True)
        ratios.append(together / alone)
    return ratios[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--workload", choices=("testbed", "dtd", "both"), default="both")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 3, 6, 12], help="group sizes (at most 12)")
    p.add_argument("--variant", default="rsnl-m4", choices=METHODS, help="the test-bed's method for every group size")
    p.add_argument("--each-method-at", type=int, default=6, help="every preset method at this group size (0: none)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per timing, test-bed (a trial has 50)")
    p.add_argument("--dtd-epochs", type=int, default=1, help="epochs per timing, DTD-shaped")
    p.add_argument("--dtd-blocks", type=int, default=1)
    p.add_argument("--dtd-views", type=int, default=2, help="augmented views of the synthetic bank")
    p.add_argument("--dtd-backbone", default="RN50")
    p.add_argument("--repeats", type=int, default=3, help="rounds of both modes, alternating (median)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="DTD-shaped: peak memory of one side-by-side step against the estimate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (a 1-CPU trial: 1)")
    p.add_argument("--procs", type=int, default=1, help="processes measuring at once (trials sharing the device)")
    p.add_argument("--workdir", help="keep the generated DTD-shaped data here")
    p.add_argument("--smoke", action="store_true", help="digits + random-init rsnl-tiny, groups 1 and 2: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.groups, args.epochs, args.repeats, args.each_method_at = [1, 2], 1, 1, 0
    if max(args.groups) > len(NOISE_SEEDS):
        p.error(f"--groups: at most {len(NOISE_SEEDS)} members")
    start = time.perf_counter()
    print(machine_info(args.device), flush=True)
    print(f"# torch threads per process {args.threads}, processes {args.procs}; members/s = 50-epoch members per "
          f"second", flush=True)
    ratio = run_procs(args) if args.procs > 1 else run(args)
    print(f"# total bench time {time.perf_counter() - start:.0f} s", flush=True)
    print(f"ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
