"""Seconds per epoch of a DTD-shaped trial: the original per-batch loop vs rsnl's trainer, side by side.

Workload: 47 classes (DTD's names), 16 shots, ptnl noise 50 %, batch 32, n_ctx 16, RN50 random init,
generated images in CoOp's DTD layout; blocks 1 and 6. In one process, on the same model object:

  reference  benchmarks/reference_loop.py: per epoch a selection pass over the augmented training loader
             (image tower + per-block 77-token text encoder on every batch, drop_last) and a training pass
             over the kept samples (image tower + per-block 77-token text encoder with gradients).
             An epoch takes many minutes on a small CPU, so a fixed number of selection batches and
             training steps is timed (after a warm-up batch) and scaled to an epoch:
             epoch = (N // 32) x selection batch + (kept // 32) x training step + selection (GMM),
             with `kept` the number of samples the fast path kept (same steps for both paths).
  fast       rsnl.train.Trainer.train_epoch() on cached features (selection on the un-augmented view,
             training on precomputed augmented views, val and test accuracy every epoch), whole epochs.
             Its feature bank has the trial's shape; its values are synthetic (class means + noise,
             L2-normalised; the epoch's compute does not depend on them) unless --full-cache builds the
             real bank from the images (12,972 RN50 passes, about half an hour on a 2-core CPU).

Also printed: the text tower's seconds per step of each path (bench_text.py's micro-benchmark for the
fast and plain paths, the text part of the reference's training steps for the 77-token loop), peak
memory of each path, and the one-time feature-cache cost (timed on a subset of the images, scaled to
the full bank; image forward passes compared with the reference's per-epoch passes).
The last line is `ratio=<reference / fast seconds per epoch>` for the largest block count (6).

    python -m benchmarks.bench_trial                  # CPU, blocks 1 and 6: 4 min on 2 idle cores
    python -m benchmarks.bench_trial --device cuda --workers 4 --fast-epochs 5 --ref-steps 5
    python -m benchmarks.bench_trial --smoke          # rsnl-tiny, 5 classes: seconds (CI)
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
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from the feature cache in benchmark output

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_common import (DTD_CLASSES, DTD_COUNTS, PeakMemory, fmt_times, machine_info, make_dtd_tree, median,
                          quiet_open_clip, timed)
from benchmarks.bench_text import report as text_report
from benchmarks.bench_text import text_steps, time_paths
from benchmarks.reference_loop import ReferenceTrainer
from rsnl.config import TrialConfig
from rsnl.data import Dataset, load_dataset
from rsnl.features import FeatureBank, build_feature_bank
from rsnl.models import load_clip
from rsnl.similarity import selection_metrics
from rsnl.device import autocast_dtype
from rsnl.trainer import build_trainer

REAL_DTD = {"train": 2820, "val": 1128, "test": 1692}  # CoOp's DTD split


def trial_config(args, data_root, blocks: int) -> TrialConfig:
    return TrialConfig(dataset="dtd", data_root=str(data_root), backbone=args.backbone, pretrained=None,
                       shots=args.shots, val_shots=args.val_shots, noise_type="ptnl", noise_rate=args.noise_rate,
                       seed=1, blocks=blocks, n_ctx=args.n_ctx, batch_size=args.batch_size, epochs=50,
                       aug_views=args.aug_views, device=args.device, precision=args.precision)


def feature_dim(model) -> int:
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    return int(dim) if dim else int(model.text_projection.shape[-1])


def synthetic_bank(ds: Dataset, identity: str, dim: int, views: int, seed: int = 0) -> FeatureBank:
    """A FeatureBank of the dataset's shape: L2-normalised class means + noise (views: + small noise)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(len(ds.classnames), dim, generator=g)

    def feats(labels, n_views=None):
        y = torch.as_tensor(np.asarray(labels))
        base = means[y] + 1.5 * torch.randn(len(y), dim, generator=g)
        if n_views is None:
            return F.normalize(base, dim=-1)
        return F.normalize(base + 0.5 * torch.randn(n_views, len(y), dim, generator=g), dim=-1)

    return FeatureBank(identity=identity, dataset=ds.name, classnames=list(ds.classnames),
                       train=feats(ds.train.labels), train_views=feats(ds.train.labels, views) if views else None,
                       val=feats(ds.val.labels), test=feats(ds.test.labels), train_labels=np.asarray(ds.train.labels),
                       val_labels=np.asarray(ds.val.labels), test_labels=np.asarray(ds.test.labels))


def subset(ds: Dataset, per_split: dict) -> Dataset:
    """The first n images of each split (the feature-cache timing runs on these)."""
    cut = {s: getattr(ds, s).subset(np.arange(min(n, len(getattr(ds, s))))) for s, n in per_split.items()}
    return Dataset(ds.name, ds.classnames, cut["train"], cut["val"], cut["test"])


def bank_passes(n: dict, views: int) -> int:
    return n["train"] * (1 + views) + n["val"] + n["test"]


def measure_cache(args, ds, clip, device, precision) -> tuple[float, list[str]]:
    """Seconds per image forward pass of build_feature_bank (fresh cache, subset of the images)."""
    part = subset(ds, {"train": args.cache_images, "val": args.cache_images // 2, "test": args.cache_images // 2})
    views = 1
    n = {s: len(getattr(part, s)) for s in ("train", "val", "test")}
    passes = bank_passes(n, views)
    with tempfile.TemporaryDirectory() as cache:
        dt, _ = timed(lambda: build_feature_bank(part, clip.model, clip.preprocess, clip.identity, aug_views=views,
                                                 cache_dir=cache, device=device, precision=precision,
                                                 batch_size=args.feature_batch_size), device=device)
    per = dt / passes
    full = {s: len(getattr(ds, s)) for s in ("train", "val", "test")}
    lines = [f"feature cache (one-time per dataset x backbone, shared by every trial of a study): "
             f"build_feature_bank on {passes} image passes ({n['train']} train x (1 + {views} view) + "
             f"{n['val'] + n['test']} val/test) took {dt:.1f} s = {1 / per:.1f} images/s",
             f"  this bench's data, {args.aug_views} views: {bank_passes(full, args.aug_views)} passes "
             f"~ {bank_passes(full, args.aug_views) * per / 60:.1f} min; "
             f"real DTD (2820/1128/1692), {args.aug_views} views: {bank_passes(REAL_DTD, args.aug_views)} passes "
             f"~ {bank_passes(REAL_DTD, args.aug_views) * per / 60:.1f} min"]
    return per, lines


def run_fast(cfg, clip, bank, epochs: int, device):
    trainer = build_trainer(cfg, clip, bank)
    # warm-up, untimed: one selection (a text-tower call and the GMMs) and the metrics' first imports
    trainer.select(0)
    selection_metrics(np.array([True, False, True]), np.array([False, True, True]), np.arange(3.0))
    history = []
    with PeakMemory(device) as mem:
        for _ in range(epochs):
            history.append(trainer.train_epoch())
    n = len(trainer.data.sample)
    kept = [round(m["kept_frac"] * n) for m in history]
    return {"epoch_s": [m["epoch_seconds"] for m in history], "kept": kept,
            "steps": [math.ceil(k / cfg.batch_size) for k in kept], "n": n, "mem": mem.describe()}


def run_reference(cfg, ds, clip, device, amp, args):
    """Times selection batches and training steps of the original loop (data loading, image tower and
    text side separately)."""
    ref = ReferenceTrainer(cfg, ds, clip, device=device, num_workers=args.workers, amp=amp)
    sel = {"load": [], "image": [], "text": []}
    train = {"load": [], "image": [], "text": []}
    with PeakMemory(device) as mem:
        it = iter(ref.selection_loader())
        for i in range(1 + args.ref_select_batches):  # the first batch is a warm-up
            t_load, (images, labels, _) = timed(next, it)
            t_img, feats = timed(ref.encode, images, device=device)
            t_txt, _ = timed(ref.score_batch, feats, labels, device=device)
            if i:
                for k, v in zip(sel, (t_load, t_img, t_txt)):
                    sel[k].append(v)
        it = iter(ref.training_loader(np.ones(len(ref.train_set), dtype=bool)))
        for _ in range(args.ref_steps):
            t_load, (images, labels, _) = timed(next, it)
            t_img, feats = timed(ref.encode, images, device=device)
            t_txt, _ = timed(ref.text_step, feats, labels, device=device)
            for k, v in zip(train, (t_load, t_img, t_txt)):
                train[k].append(v)
        del it
    # the selection step after the pass: robust similarity + GMM over the samples it saw
    n = len(ref.train_set)
    seen = (n // cfg.batch_size) * cfg.batch_size
    g = torch.Generator().manual_seed(0)
    t_gmm, _ = timed(ref.selection_from, np.arange(seen), F.normalize(torch.randn(seen, 64, generator=g), dim=-1),
                     torch.randn(seen, generator=g).numpy(), 0)
    return {"sel": sel, "train": train, "gmm": t_gmm, "mem": mem.describe()}


def compare(cfg, fast, ref, bank_passes_full: int) -> tuple[float, list[str]]:
    B = cfg.batch_size
    n_sel = fast["n"] // B
    kept = round(float(np.mean(fast["kept"])))
    n_train = kept // B if kept >= B else 1
    sel_batch = sum(median(v) for v in ref["sel"].values())
    train_step = sum(median(v) for v in ref["train"].values())
    ref_epoch = n_sel * sel_batch + n_train * train_step + ref["gmm"]
    fast_epoch = median(fast["epoch_s"])
    ratio = ref_epoch / fast_epoch
    no_text_in_sel = n_sel * (median(ref["sel"]["load"]) + median(ref["sel"]["image"])) + median(ref["sel"]["text"]) \
        + n_train * train_step + ref["gmm"]
    image_passes = (n_sel + n_train) * B
    lines = [
        f"  fast      {fast_epoch:8.2f} s/epoch (median of {len(fast['epoch_s'])} epochs "
        f"{fmt_times(fast['epoch_s'])}; kept {fast['kept']} of {fast['n']} -> {fast['steps']} steps; "
        f"selection, training, val + test accuracy); {fast['mem']}",
        f"  reference {ref_epoch:8.2f} s/epoch = {n_sel} selection batches x {sel_batch:.2f} s + {n_train} training "
        f"steps x {train_step:.2f} s + selection {ref['gmm']:.2f} s (timed {len(ref['sel']['image'])} batches + "
        f"{len(ref['train']['image'])} steps, scaled; test at the end only, not counted); {ref['mem']}",
        f"    selection batch: load {median(ref['sel']['load']):.2f} + image tower {median(ref['sel']['image']):.2f} "
        f"+ text {median(ref['sel']['text']):.2f} s; training step: load {median(ref['train']['load']):.2f} + "
        f"image tower {median(ref['train']['image']):.2f} + text {median(ref['train']['text']):.2f} s "
        f"(text runs {fmt_times(ref['train']['text'])})",
        f"    image-tower passes: reference {image_passes} per epoch, {50 * image_passes} per 50-epoch trial; "
        f"fast 0 (its one-time feature bank of this data, {bank_passes_full} passes = "
        f"{bank_passes_full / image_passes:.1f} reference epochs, serves every trial of a study)",
        f"  per-epoch ratio reference / fast: {ratio:.1f}x (reference with text once per selection pass instead "
        f"of per batch: {no_text_in_sel / fast_epoch:.1f}x)",
        f"  50-epoch trial estimate: reference {50 * ref_epoch / 3600:.2f} h, fast {50 * fast_epoch / 60:.1f} min",
    ]
    return ratio, lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast on CUDA for both paths (auto: bf16); the CPU runs fp32")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 6])
    p.add_argument("--backbone", default="RN50")
    p.add_argument("--classes", type=int, default=47)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--val-shots", type=int, default=4)
    p.add_argument("--noise-rate", type=float, default=0.5)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--aug-views", type=int, default=10)
    p.add_argument("--fast-epochs", type=int, default=2, help="whole epochs of the fast path (median)")
    p.add_argument("--ref-steps", type=int, default=2, help="timed training steps of the reference")
    p.add_argument("--ref-select-batches", type=int, default=2, help="timed selection batches of the reference")
    p.add_argument("--text-reps", type=int, default=3, help="timed runs of the fast and plain text micro-benchmark")
    p.add_argument("--cache-images", type=int, default=32, help="train images of the feature-cache timing subset")
    p.add_argument("--full-cache", action="store_true", help="build the real feature bank for the fast path (slow)")
    p.add_argument("--feature-batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data-loader workers of the reference")
    p.add_argument("--image-size", type=int, default=64, help="side of the generated images")
    p.add_argument("--workdir", help="keep the generated data here (default: a temporary folder)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="rsnl-tiny, 5 classes, 4 shots, n_ctx 4, batch 8: seconds")
    args = p.parse_args(argv)
    counts = dict(DTD_COUNTS)
    if args.smoke:
        args.backbone, args.classes, args.shots, args.val_shots, args.n_ctx = "rsnl-tiny", 5, 4, 2, 4
        args.batch_size, args.aug_views, args.fast_epochs, args.ref_steps, args.ref_select_batches = 8, 2, 1, 1, 1
        args.text_reps, args.cache_images, args.image_size = 1, 8, 24
        counts = {"train": 8, "val": 4, "test": 2}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    print(machine_info(args.device), flush=True)
    print(f"# workload: {args.classes} classes x {args.shots} shots, ptnl noise {args.noise_rate}, batch "
          f"{args.batch_size}, n_ctx {args.n_ctx}, {args.backbone} random init, {args.aug_views} augmented views, "
          f"blocks {args.blocks}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = make_dtd_tree(Path(args.workdir or tmp) / "data", DTD_CLASSES[: args.classes], counts, args.image_size)
        ds = load_dataset("dtd", str(root))
        with quiet_open_clip():
            clip = load_clip(args.backbone, None, device)
        amp = autocast_dtype(args.precision, device)
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
        print(f"# data: {len(ds.train)} / {len(ds.val)} / {len(ds.test)} generated images (train/val/test) "
              f"at {root}; precision {precision}", flush=True)

        _, lines = measure_cache(args, ds, clip, device, precision)
        print("\n".join(lines), flush=True)
        if args.full_cache:
            t, bank = timed(lambda: build_feature_bank(ds, clip.model, clip.preprocess, clip.identity,
                                                       aug_views=args.aug_views, cache_dir=Path(args.workdir or tmp) / "cache",
                                                       device=device, precision=precision,
                                                       batch_size=args.feature_batch_size), device=device)
            print(f"  full bank built in {t:.1f} s", flush=True)
        else:
            bank = synthetic_bank(ds, clip.identity, feature_dim(clip.model), args.aug_views)

        ratios = {}
        for blocks in args.blocks:
            cfg = trial_config(args, root, blocks)
            print(f"\n== blocks {blocks} ==", flush=True)
            steps, tokens = text_steps(clip.model, clip.tokenizer, ds.classnames, blocks, args.n_ctx, device, amp,
                                       batch=args.batch_size)
            steps.pop("ref77")  # measured below inside the reference's training steps
            times = time_paths(steps, {"plain": args.text_reps, "fast": args.text_reps}, device)
            fast = run_fast(cfg, clip, bank, args.fast_epochs, device)
            ref = run_reference(cfg, ds, clip, device, amp, args)
            times = {"ref77": ref["train"]["text"], **times}
            label = (f"{blocks} blocks x {len(ds.classnames)} classes (ref77 = text part of the reference's "
                     f"training steps, incl. its SGD step)")
            print("\n".join(text_report(times, tokens, label)), flush=True)
            full = {s: len(getattr(ds, s)) for s in ("train", "val", "test")}
            ratio, lines = compare(cfg, fast, ref, bank_passes(full, args.aug_views))
            print("\n".join(lines), flush=True)
            ratios[blocks] = ratio
    print(f"\n# total bench time {time.perf_counter() - start:.0f} s", flush=True)
    print(f"ratio={ratios[max(ratios)]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
