"""One trial: the epoch loop of DESIGN sections 3-4, its metrics and its checkpoints.

Per epoch e: robust similarity G with alpha(e) from the prompts as they stand -> clean selection
(before epoch 0 and after every epoch) -> loss on the kept samples with their noisy labels, batches
of precomputed features (the image tower never runs here) -> evaluation -> one metrics dict.

    python -m rsnl.train --config rsnl/configs/digits.yaml --set noise_rate=0.5 --set blocks=4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsnl.config import ConfigError, TrialConfig, load_yaml, parse_overrides
from rsnl.data import DataError, check_shots, load_dataset
from rsnl.features import FeatureBank, build_feature_bank
from rsnl.files import atomic_write
from rsnl.manifest import manifest_text, read_manifest, write_manifest
from rsnl.manifest import sha256 as manifest_sha256
from rsnl.models import LoadedClip, ModelError, PromptMatrix, check_backbone, load_clip_full
from rsnl.noise import NoisySample, sample_noisy_fewshot
from rsnl.ot import select_by_ot
from rsnl.similarity import (alpha_schedule, feature_similarity, prompt_similarity, robust_similarity,
                             select_clean, selection_metrics)
from rsnl.zeroshot import zeroshot_accuracy

USER_ERRORS = (ConfigError, DataError, ModelError)
RUNTIME_KEYS = ("device", "precision", "cache_dir", "num_workers", "feature_batch_size", "data_root", "download")


class NonFiniteError(FloatingPointError):
    """A metric that must be finite (the loss) was NaN or inf; names the epoch and the metric."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} was asked for but no CUDA GPU is visible; use device: cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device):
    """Mixed precision on CUDA only ('auto' -> bf16 there); the CPU path stays fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


# --- inputs -----------------------------------------------------------------------------------

def preflight(cfg: TrialConfig):
    """Every check that needs no model: backbone/weights names, data layout, shots. Returns the dataset."""
    check_backbone(cfg.backbone, cfg.pretrained)
    dataset = load_dataset(cfg.dataset, cfg.data_root or os.environ.get("RSNL_DATA"), cfg.download)
    check_shots(dataset.train.labels, dataset.classnames, cfg.shots, dataset.train.name)
    check_shots(dataset.val.labels, dataset.classnames, cfg.val_shots or cfg.shots, dataset.val.name)
    return dataset


def prepare_weights(cfg: TrialConfig) -> None:
    """Build rsnl's stand-in VLM now if the trial uses it and it is not cached yet (progress shown here,
    not later inside a worker)."""
    from rsnl.pretrain import ensure_standin, is_standin
    if is_standin(cfg.backbone, cfg.pretrained):
        ensure_standin(cfg.backbone, cfg.pretrained, cfg.cache_dir)


def load_inputs(cfg: TrialConfig, stats: dict | None = None) -> tuple[LoadedClip, FeatureBank]:
    """The model and the study-shareable image features of the trial's backbone and dataset."""
    dataset = preflight(cfg)
    device = resolve_device(cfg.device)
    clip = load_clip_full(cfg.backbone, cfg.pretrained, device, cfg.cache_dir)
    bank = build_feature_bank(dataset, clip.model, clip.preprocess, clip.identity, aug_views=cfg.aug_views,
                              cache_dir=cfg.cache_dir, device=device,
                              precision=_feature_precision(cfg, device), batch_size=cfg.feature_batch_size,
                              num_workers=cfg.num_workers, stats=stats, tokenizer=clip.tokenizer,
                              aug_scale=cfg.aug_scale)
    return clip, bank


def _feature_precision(cfg, device) -> str:
    dtype = autocast_dtype(cfg.precision, device)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@dataclass
class TrialData:
    """The trial's few-shot sample with its noise, as feature tensors."""
    train: torch.Tensor               # [N, D] un-augmented view
    train_views: torch.Tensor | None  # [V, N, D]
    sample: NoisySample
    val: torch.Tensor
    val_sample: NoisySample
    test: torch.Tensor
    test_labels: np.ndarray
    zeroshot_text: torch.Tensor | None = None  # [C, D] the plain prompt's text features
    manifest: str | None = None  # the draw as a noise manifest (rsnl/manifest.py); None without image ids


NOISE_RATE_TOLERANCE = 0.05  # a replayed manifest's noisy share must match the trial's noise_rate this closely


def draw_samples(cfg: TrialConfig, bank: FeatureBank) -> tuple[NoisySample, NoisySample]:
    """The train and val samples: drawn by the seed, or read from cfg.noise_file."""
    if cfg.noise_file is None:
        C = len(bank.classnames)
        s = sample_noisy_fewshot(bank.train_labels, C, cfg.shots, cfg.noise_rate, cfg.noise_type, cfg.seed)
        v = sample_noisy_fewshot(bank.val_labels, C, cfg.val_shots or cfg.shots, cfg.noise_rate, cfg.noise_type,
                                 cfg.seed)
        return s, v
    if bank.train_ids is None or bank.val_ids is None:
        raise ConfigError("noise_file: this feature bank has no image ids to match a manifest against")
    drawn = read_manifest(cfg.noise_file, {"train": bank.train_ids, "val": bank.val_ids},
                          {"train": bank.train_labels, "val": bank.val_labels}, bank.classnames)
    share = drawn["train"].noise_fraction
    if abs(share - cfg.noise_rate) > NOISE_RATE_TOLERANCE:
        raise ConfigError(f"noise_file: {cfg.noise_file} has {share:.1%} noisy training labels but the trial says "
                          f"noise_rate {cfg.noise_rate:g}; set noise_rate to the manifest's rate (reports group by it)")
    return drawn["train"], drawn["val"]


def trial_data(cfg: TrialConfig, bank: FeatureBank) -> TrialData:
    s, v = draw_samples(cfg, bank)
    manifest = None
    if bank.train_ids is not None and bank.val_ids is not None:
        manifest = manifest_text({"train": s, "val": v}, {"train": bank.train_ids, "val": bank.val_ids},
                                 bank.classnames)
    idx = torch.as_tensor(s.indices)
    # A bank may hold more views than this trial uses; view v is the same whatever their number.
    views = bank.train_views[: cfg.aug_views, idx] if bank.train_views is not None and cfg.aug_views > 0 else None
    if views is not None and views.shape[0] < cfg.aug_views:
        raise ValueError(f"feature bank has {views.shape[0]} augmented views, the trial asks for {cfg.aug_views}")
    return TrialData(train=bank.train[idx], train_views=views, sample=s, val=bank.val[torch.as_tensor(v.indices)],
                     val_sample=v, test=bank.test, test_labels=np.asarray(bank.test_labels),
                     zeroshot_text=bank.zeroshot_text, manifest=manifest)


# --- losses -----------------------------------------------------------------------------------

def noisy_label_loss(logits: torch.Tensor, y: torch.Tensor, kind: str, q: float = 0.7) -> torch.Tensor:
    """ce; gce = (1 - p_y^q) / q (the robust loss PTNL uses); mae = 2 (1 - p_y) = ||softmax - onehot||_1."""
    if kind == "ce":
        return F.cross_entropy(logits, y)
    p_y = logits.float().softmax(-1).gather(1, y[:, None]).squeeze(1)
    if kind == "gce":
        return ((1.0 - p_y.clamp_min(1e-7) ** q) / q).mean()
    if kind == "mae":
        return (2.0 * (1.0 - p_y)).mean()
    raise ValueError(f"loss {kind!r}: allowed ce, gce, mae")


# --- the trainer ------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: TrialConfig, data: TrialData, clip_model, tokenizer, classnames, device=None):
        self.cfg, self.data = cfg, data
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.amp = autocast_dtype(cfg.precision, self.device)
        init = torch.Generator().manual_seed(cfg.seed)
        self.prompts = PromptMatrix(clip_model, tokenizer, classnames, blocks=cfg.blocks, n_ctx=cfg.n_ctx,
                                    ctx_init=cfg.ctx_init, csc=cfg.csc,
                                    class_token_position=cfg.class_token_position, generator=init).to(self.device)
        self.logit_scale = clip_model.logit_scale.detach().exp().to(self.device)
        self.optimizer = torch.optim.SGD(self.prompts.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0
        self.history: list[dict] = []
        to = lambda t: None if t is None else t.to(self.device)
        self.train_f, self.views = to(data.train), to(data.train_views)
        self.val_f, self.test_f = to(data.val), to(data.test)
        self.labels = torch.as_tensor(data.sample.labels, device=self.device)
        self.feature_sim = feature_similarity(self.train_f, data.sample.labels)  # fixed: frozen features
        # the zero-shot baseline on the same test split: constant, reported every epoch beside test_acc
        self.zeroshot_acc = (float("nan") if data.zeroshot_text is None
                             else zeroshot_accuracy(data.test, data.zeroshot_text, data.test_labels))
        self.manifest_sha256 = None if data.manifest is None else manifest_sha256(data.manifest)
        self.ot_residual = float("nan")  # rows' L1 error of the last OT plan (selector ot)

    def _lr_factor(self, epoch: int) -> float:
        """Constant warm-up lr, then cosine over all epochs (CoOp's schedule), stepped per epoch."""
        if epoch < self.cfg.warmup_epochs:
            return self.cfg.warmup_lr / self.cfg.lr
        return 0.5 * (1.0 + math.cos(math.pi * epoch / self.cfg.epochs))

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    @torch.no_grad()
    def robust_scores(self, epoch: int) -> tuple[float, np.ndarray]:
        alpha = alpha_schedule(epoch, self.cfg.alpha_base, self.cfg.alpha_rate)
        text = self.prompts.text_features()
        g = robust_similarity(prompt_similarity(self.train_f, text, self.data.sample.labels), self.feature_sim, alpha)
        return alpha, g

    def select(self, epoch: int) -> tuple[float, np.ndarray, np.ndarray]:
        """(alpha, score, keep): the clean samples of this epoch and the score that ranks them (G, or
        Q_{i, y~_i} for the OT selector, where alpha has no role and is NaN)."""
        if self.cfg.selector == "ot":
            with torch.no_grad(), self._autocast():
                probs = self.prompts(self.train_f, self.logit_scale).double().softmax(-1)
            keep, score, self.ot_residual = select_by_ot(probs, self.data.sample.labels, self.cfg.ot_eps,
                                                         self.cfg.ot_cost)
            return float("nan"), score, keep
        alpha, g = self.robust_scores(epoch)
        keep = select_clean(g, self.data.sample.labels, self.cfg.selector, threshold=self.cfg.gmm_threshold,
                            ratio=self.cfg.select_ratio, reg_covar=self.cfg.gmm_reg_covar, seed=self.cfg.seed)
        return alpha, g, keep

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, labels) -> float:
        with self._autocast():
            text = self.prompts.text_features()
            pred = torch.einsum("nd,bcd->nc", feats.to(text.dtype), text).argmax(-1)
        return 100.0 * (pred.cpu().numpy() == np.asarray(labels)).mean()

    def train_epoch(self) -> dict:
        cfg, e = self.cfg, self.epoch
        start = time.perf_counter()
        alpha, g, keep = self.select(e)
        # kept samples with the trial's loss; with ce+mae (NLPrompt) then the rest with MAE, in batches of
        # their own as NLPrompt's trainer does
        phases = [(keep, "ce" if cfg.loss == "ce+mae" else cfg.loss)]
        if cfg.loss == "ce+mae":
            phases.append((~keep, "mae"))
        lr = self.optimizer.param_groups[0]["lr"]
        total, correct, seen = 0.0, 0, 0
        self.prompts.train()
        for mask, loss_kind in phases:
            kept = torch.as_tensor(np.flatnonzero(mask), device=self.device)
            order = kept[torch.randperm(len(kept), generator=self.generator).to(self.device)]
            view = (torch.randint(self.views.shape[0], (len(kept),), generator=self.generator).to(self.device)
                    if self.views is not None else None)
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s: s + cfg.batch_size]
                f = self.views[view[s: s + cfg.batch_size], idx] if view is not None else self.train_f[idx]
                y = self.labels[idx]
                with self._autocast():
                    logits = self.prompts(f, self.logit_scale)
                    loss = noisy_label_loss(logits, y, loss_kind, cfg.gce_q)
                    if cfg.loss == "ce+mae" and loss_kind == "mae":
                        loss = loss / 2  # NLPrompt's MAE is mean(1 - p_y), half of rsnl's mae
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"epoch {e}: train_loss is {loss.item()} (batch starting at {s}); "
                                         f"lower lr or use precision fp32")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                total += loss.item() * len(idx)
                correct += int((logits.argmax(-1) == y).sum())
                seen += len(idx)
        self.scheduler.step()
        self.prompts.eval()
        metrics = {
            "epoch": e,
            "lr": lr,
            "train_loss": total / max(seen, 1),
            "train_acc": 100.0 * correct / max(seen, 1),
            "val_acc": self.accuracy(self.val_f, self.data.val_sample.labels),
            "test_acc": self.accuracy(self.test_f, self.data.test_labels),
            "zeroshot_acc": self.zeroshot_acc,
            "alpha": alpha,
            **selection_metrics(keep, self.data.sample.is_noisy, g),
            **({"ot_residual": self.ot_residual} if cfg.selector == "ot" else {}),
            "epoch_seconds": time.perf_counter() - start,
        }
        # Plain Python numbers: checkpoints are read back with weights_only=True, which refuses numpy scalars.
        metrics = {k: int(v) if k == "epoch" else float(v) for k, v in metrics.items()}
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteError(f"epoch {e}: train_loss is {metrics['train_loss']}")
        self.epoch += 1
        self.history.append(metrics)
        return metrics

    def run(self, on_epoch=None) -> list[dict]:
        while not self.done:
            m = self.train_epoch()
            if on_epoch is not None:
                on_epoch(m, self)
        return self.history

    # -- checkpoints: everything that makes the next epoch identical to an uninterrupted run ----
    def state_dict(self) -> dict:
        return {
            "format": 1,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "prompts": self.prompts.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        check_same_config(state, self.cfg)
        self.prompts.load_state_dict(state["prompts"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])

    def save(self, path) -> None:
        save_checkpoint(self.state_dict(), path)


def check_same_config(state: dict, cfg: TrialConfig) -> None:
    """A checkpoint continues only the run that made it; runtime keys (device, cache, ...) may differ."""
    saved = {k: v for k, v in state["config"].items() if k not in RUNTIME_KEYS}
    mine = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_KEYS}
    changed = sorted(k for k in mine if saved.get(k) != mine[k])
    if changed:
        raise ConfigError(f"checkpoint: made with a different config ({', '.join(changed)}); "
                          f"resume with the same settings or start a new run")


def save_checkpoint(state: dict, path) -> None:
    """Atomic: a kill mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def build_trainer(cfg: TrialConfig, clip: LoadedClip, bank: FeatureBank) -> Trainer:
    return Trainer(cfg, trial_data(cfg, bank), clip.model, clip.tokenizer, bank.classnames)


def run(cfg: TrialConfig, on_epoch=None, resume_from=None, inputs=None) -> list[dict]:
    """Train one trial to the end; `inputs` = (clip, bank) to reuse features across trials."""
    clip, bank = inputs or load_inputs(cfg)
    trainer = build_trainer(cfg, clip, bank)
    if resume_from is not None:
        trainer.load_state_dict(resume_from if isinstance(resume_from, dict) else load_checkpoint(resume_from))
    return trainer.run(on_epoch)


# --- command line -----------------------------------------------------------------------------

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
        values = {}
        for path in args.config:
            values.update(load_yaml(path))
        values.update(parse_overrides(args.set))
        cfg = TrialConfig.from_dict(values)
        if args.resume and not args.out:
            raise ConfigError("--resume: needs --out DIR, the folder of the run to continue")
        out = Path(args.out) if args.out else None
        state = None
        if args.resume:
            if not (out / "checkpoint.pt").is_file():
                raise ConfigError(f"--resume: {out / 'checkpoint.pt'} does not exist")
            state = load_checkpoint(out / "checkpoint.pt")
            check_same_config(state, cfg)  # before any model or feature work (DESIGN section 8)
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
