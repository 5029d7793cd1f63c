"""`python -m rsnl.train`: one trial from YAML files, no Ray; a table row per epoch.

    python -m rsnl.train --config rsnl/configs/fashion-mnist.yaml --config rsnl/configs/methods/robust.yaml \\
        --set noise_rate=0.5 --out runs/robust-50

With --out, every epoch leaves checkpoint.pt and metrics.jsonl there (atomically), and the draw as
noise_manifest.csv; --resume continues from the checkpoint exactly as if never stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rsnl.config import TrialConfig
from rsnl.errors import USER_ERRORS, ConfigError, NonFiniteError
from rsnl.files import atomic_write
from rsnl.inputs import load_inputs
from rsnl.manifest import write_manifest
from rsnl.trainer import build_trainer, check_same_config, load_checkpoint

COLUMNS = [("epoch", "{:>5d}"), ("lr", "{:>9.2e}"), ("train_loss", "{:>10.4f}"), ("val_acc", "{:>7.2f}"),
           ("test_acc", "{:>8.2f}"), ("alpha", "{:>6.3f}"), ("kept_frac", "{:>9.3f}"),
           ("select_precision", "{:>9.3f}"), ("select_recall", "{:>8.3f}"), ("noise_auroc", "{:>6.3f}"),
           ("epoch_seconds", "{:>6.2f}")]
HEADERS = ["epoch", "lr", "train_loss", "val_acc", "test_acc", "alpha", "kept_frac", "precision", "recall",
           "auroc", "sec"]


def format_row(m: dict) -> str:
    cells = []
    for (key, fmt), head in zip(COLUMNS, HEADERS):
        v = m.get(key)
        cell = fmt.format(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else "-"
        cells.append(cell.rjust(max(len(head), len(fmt.format(0)))))
    return " ".join(cells)


def format_header() -> str:
    return " ".join(h.rjust(max(len(h), len(fmt.format(0)))) for (_, fmt), h in zip(COLUMNS, HEADERS))


def json_safe(m: dict) -> dict:
    """NaN (e.g. AUROC without noisy samples) becomes null so that the line is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsnl.train", description="Train one trial (no Ray).")
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="trial config; repeat to layer files (later ones win), e.g. a dataset and a method file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--out", metavar="DIR", help="write metrics.jsonl and checkpoint.pt here after every epoch, "
                                                "and the draw as noise_manifest.csv")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (needs --out)")
    args = p.parse_args(argv)
    try:
        cfg = TrialConfig.from_yaml(*args.config, overrides=args.set)
        if args.resume and not args.out:
            raise ConfigError("--resume: needs --out DIR, the folder of the run to continue")
        out = Path(args.out) if args.out else None
        state = None
        if args.resume:
            if not (out / "checkpoint.pt").is_file():
                raise ConfigError(f"--resume: {out / 'checkpoint.pt'} does not exist")
            state = load_checkpoint(out / "checkpoint.pt", key="--resume")
            check_same_config(state, cfg)  # before any model or feature work
        clip, bank = load_inputs(cfg)  # preflight first: data, names and shots before any model
        trainer = build_trainer(cfg, clip, bank)
        if state is not None:
            trainer.load_state_dict(state)
    except USER_ERRORS as e:
        print(f"rsnl: error: {e}", file=sys.stderr)
        return 2

    if out is not None and trainer.data.manifest is not None:
        write_manifest(out, trainer.data.manifest)
    s = trainer.data.sample
    print(f"# {cfg.dataset} {cfg.backbone}/{cfg.pretrained or 'random-init'}: {len(s)} samples, "
          f"{int(s.is_noisy.sum())} noisy ({cfg.noise_type} {cfg.noise_rate}), blocks {cfg.blocks}, "
          f"selector {cfg.selector}, loss {cfg.loss}, device {trainer.device}", flush=True)
    if math.isfinite(trainer.zeroshot_acc):
        print(f"# zero-shot ('a photo of a {{class}}.', no training): test_acc {trainer.zeroshot_acc:.2f}", flush=True)
    print(format_header(), flush=True)
    for m in trainer.history:
        print(format_row(m), flush=True)

    def on_epoch(m, tr):
        print(format_row(m), flush=True)
        if out is not None:
            tr.save(out / "checkpoint.pt")
            # rewritten from the checkpoint's history: a kill between the two writes loses no line
            atomic_write(out / "metrics.jsonl", "".join(json.dumps(json_safe(h)) + "\n" for h in tr.history))

    try:
        trainer.run(on_epoch)
    except NonFiniteError as e:
        print(f"rsnl: error: {e}", file=sys.stderr)
        return 3
    print(json.dumps({**json_safe(trainer.history[-1]), "noise_manifest_sha256": trainer.manifest_sha256}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
