"""Text-tower micro-benchmark: one training step's text side for m blocks x C classes.

Forward + backward of cross-entropy on a batch of 32 fixed image features, through
  ref77  the original pattern: one text-encoder call per block at the full 77-token context
         (benchmarks/reference_loop.py),
  plain  PromptMatrix's batched path (pm.fast = False): all m x C prompts in one call, cut after the
         longest EOS,
  fast   PromptMatrix's prefix-shared path: SOS + context once per block, class suffixes attend to it.
All three share the same tower and the same context parameter; rounds interleave the paths, the first
round is a warm-up, and the median of the rest is reported.

    python -m benchmarks.bench_text                      # RN50, 6 blocks x 47 classes, n_ctx 16, CPU
    python -m benchmarks.bench_text --device cuda --reps 20
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from benchmarks.bench_common import DTD_CLASSES, fmt_times, machine_info, median, quiet_open_clip, timed
from benchmarks.reference_loop import ReferenceCLIP
from rsnl.device import autocast_dtype
from rsnl.models import PromptMatrix, load_clip

def text_steps(model, tokenizer, classnames, blocks: int, n_ctx: int = 16, device="cpu", amp=None, batch: int = 32):
    """{path: step()} for the paths of the module docstring, plus token counts {path: tokens}."""
    device = torch.device(device)
    pm = PromptMatrix(model, tokenizer, classnames, blocks=blocks, n_ctx=n_ctx,
                      generator=torch.Generator().manual_seed(0)).to(device)
    ref = ReferenceCLIP(model, pm, tokenizer, classnames)
    with torch.no_grad():
        dim = pm.text_features().shape[-1]
    g = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device)
    y = torch.randint(len(classnames), (batch,), generator=g).to(device)
    scale = model.logit_scale.detach().exp()

    def step(logits_fn, fast=None):
        def run():
            if fast is not None:
                pm.fast = fast
            pm.ctx.grad = None
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(logits_fn().float(), y)
            loss.backward()
            return loss
        return run

    steps = {"ref77": step(lambda: ref.logits(f)), "plain": step(lambda: pm(f, scale), fast=False),
             "fast": step(lambda: pm(f, scale), fast=True)}
    m, C, P = blocks, len(classnames), 1 + pm.n_ctx
    tokens = {"ref77": m * C * 77, "plain": m * C * pm.length, "fast": m * P + m * C * (pm.length - P)}
    return steps, tokens


def time_paths(steps: dict, reps: dict, device="cpu", warmup: int = 1) -> dict:
    """Interleaved rounds; path p runs warmup + reps[p] times; returns {path: [seconds of timed runs]}."""
    times = {p: [] for p in steps}
    for r in range(warmup + max(reps.values())):
        for p, fn in steps.items():
            if r < warmup + reps[p]:
                dt, _ = timed(fn, device=device)
                if r >= warmup:
                    times[p].append(dt)
    return times


def report(times: dict, tokens: dict, label: str) -> list[str]:
    med = {p: median(t) for p, t in times.items()}
    lines = [f"text tower, {label}: forward + backward seconds per step (median of timed runs)"]
    for p in times:
        lines.append(f"  {p:6s} {med[p]:8.3f} s  {tokens[p]:6d} tokens  runs {fmt_times(times[p])}")
    if "ref77" in med and "fast" in med:
        lines.append(f"  ratios: ref77/fast {med['ref77'] / med['fast']:.1f}x, ref77/plain "
                     f"{med['ref77'] / med['plain']:.1f}x, plain/fast {med['plain'] / med['fast']:.1f}x")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="RN50")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--classes", type=int, default=47, help="the first N of DTD's 47 class names")
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed runs of the plain and fast paths")
    p.add_argument("--ref-reps", type=int, default=3, help="timed runs of the 77-token loop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast on CUDA (auto: bf16); the CPU runs fp32")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_info(args.device), flush=True)
    with quiet_open_clip():
        clip = load_clip(args.backbone, None, device)
    amp = autocast_dtype(args.precision, device)
    classnames = DTD_CLASSES[: args.classes]
    steps, tokens = text_steps(clip.model, clip.tokenizer, classnames, args.blocks, args.n_ctx, device, amp)
    times = time_paths(steps, {"ref77": args.ref_reps, "plain": args.reps, "fast": args.reps}, device)
    label = (f"{args.backbone} random init, {args.blocks} blocks x {len(classnames)} classes, n_ctx {args.n_ctx}, "
             f"batch 32, {'fp32' if amp is None else amp}")
    print("\n".join(report(times, tokens, label)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
