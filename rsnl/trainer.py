"""The trainer: one trial's epoch loop, its losses and its checkpoints.

Per epoch e: the robust similarity G with alpha(e) from the prompts as they stand -> clean selection
-> loss on the kept samples with their noisy labels, in batches of precomputed image features (the
image tower never runs here) -> evaluation -> one metrics dict. The method is in docs/method.md.
"""

from __future__ import annotations

import math
import pickle
import time

import numpy as np
import torch
import torch.nn.functional as F

from rsnl.config import LOSSES, TrialConfig
from rsnl.device import autocast_dtype, resolve_device
from rsnl.errors import ConfigError, DataError, NonFiniteError
from rsnl.features import FeatureBank
from rsnl.files import atomic_write
from rsnl.inputs import TrialData, trial_data
from rsnl.manifest import sha256 as manifest_sha256
from rsnl.models import LoadedClip, PromptMatrix
from rsnl.ot import select_by_ot
from rsnl.similarity import (alpha_schedule, block_cosine, clean_auroc, feature_similarity, prompt_similarity,
                             robust_similarity, select_clean, selection_metrics)
from rsnl.zeroshot import zeroshot_accuracy

# keys that may differ between a checkpoint and the run that continues it (where, not what, it computes)
RUNTIME_KEYS = ("device", "precision", "cache_dir", "num_workers", "feature_batch_size", "data_root", "download")


def noisy_label_loss(logits: torch.Tensor, y: torch.Tensor, kind: str, q: float = 0.5) -> torch.Tensor:
    """One of config.LOSSES but ce+mae (the trainer applies its two parts to two sets of samples).

    ce; gce = (1 - p_y^q) / q, the robust loss of PTNL; mae = 2 (1 - p_y) = ||softmax - onehot||_1.
    """
    if kind == "ce":
        return F.cross_entropy(logits, y)
    p_y = logits.float().softmax(-1).gather(1, y[:, None]).squeeze(1)
    if kind == "gce":
        return ((1.0 - p_y.clamp_min(1e-7) ** q) / q).mean()
    if kind == "mae":
        return (2.0 * (1.0 - p_y)).mean()
    raise ValueError(f"loss {kind!r}: allowed {', '.join(k for k in LOSSES if k != 'ce+mae')}")


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
        """Constant warm-up lr, then cosine over all epochs, stepped per epoch; with warmup_recount the
        cosine starts after the warm-up (Dassl's count)."""
        cfg = self.cfg
        if epoch < cfg.warmup_epochs:
            return cfg.warmup_lr / cfg.lr
        step = epoch - cfg.warmup_epochs if cfg.warmup_recount else epoch
        return 0.5 * (1.0 + math.cos(math.pi * step / cfg.epochs))

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    @torch.no_grad()
    def select(self, epoch: int) -> dict:
        """This epoch's clean samples from the prompts as they stand: {alpha, score, keep, diagnostics}.
        score ranks the samples: G, or Q_{i, y~_i} for the OT selector (where alpha has no role and is NaN).
        diagnostics: how well each side of G alone separates clean from noisy samples, and how far the
        blocks differ (the prompt side is computed for every selector, so baselines report it too)."""
        cfg = self.cfg
        text = self.prompts.text_features()
        prompt_sim = prompt_similarity(self.train_f, text, self.data.sample.labels)
        noisy = self.data.sample.is_noisy
        diagnostics = {"feature_auroc": clean_auroc(self.feature_sim, noisy),
                       "prompt_auroc": clean_auroc(prompt_sim, noisy), "block_cosine": block_cosine(text)}
        if cfg.selector == "ot":
            with self._autocast():
                probs = self.prompts(self.train_f, self.logit_scale).double().softmax(-1)
            keep, score, self.ot_residual = select_by_ot(probs, self.data.sample.labels, cfg.ot_eps, cfg.ot_cost)
            return {"alpha": float("nan"), "score": score, "keep": keep, "diagnostics": diagnostics}
        alpha = alpha_schedule(max(epoch - cfg.alpha_lag, 0), cfg.alpha_base, cfg.alpha_rate)
        score = robust_similarity(prompt_sim, self.feature_sim, alpha)
        keep = select_clean(score, self.data.sample.labels, cfg.selector, threshold=cfg.gmm_threshold,
                            ratio=cfg.select_ratio, reg_covar=cfg.gmm_reg_covar, max_iter=cfg.gmm_max_iter,
                            tol=cfg.gmm_tol, seed=cfg.seed)
        return {"alpha": alpha, "score": score, "keep": keep, "diagnostics": diagnostics}

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
        selection = self.select(e)
        alpha, score, keep = selection["alpha"], selection["score"], selection["keep"]
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
            # drop_last as the original code's loader: the last incomplete batch goes when a full one exists
            full = len(order) >= cfg.batch_size
            end = len(order) - len(order) % cfg.batch_size if cfg.drop_last and full else len(order)
            for s in range(0, end, cfg.batch_size):
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
            **selection_metrics(keep, self.data.sample.is_noisy, score),
            **selection["diagnostics"],
            **({"ot_residual": self.ot_residual} if cfg.selector == "ot" else {}),
            "epoch_seconds": time.perf_counter() - start,
        }
        # Plain Python numbers: checkpoints are read back with weights_only=True, which refuses numpy scalars.
        metrics = {k: int(v) if k == "epoch" else float(v) for k, v in metrics.items()}
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
            "format": CHECKPOINT_FORMAT,
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


CHECKPOINT_FORMAT = 1
# what Trainer.state_dict writes, by type: a file without these is not a checkpoint this code can continue
CHECKPOINT_KEYS = {"config": dict, "epoch": int, "prompts": dict, "optimizer": dict, "scheduler": dict,
                   "scaler": dict, "generator": torch.Tensor, "history": list}


def load_checkpoint(path, key: str = "checkpoint") -> dict:
    """A checkpoint written by Trainer.save. A truncated file, another program's file or another format is
    a DataError naming `key` and the file, not a traceback from torch.load or a KeyError later."""
    def refuse(why: str):
        raise DataError(f"{key}: {path} is not a readable rsnl checkpoint ({why}); delete it to start the run "
                        "over, or point --out at the folder of the run to continue")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails as many types (EOFError, RuntimeError, UnpicklingError, OSError)
        # the weights-only unpickler's message is a paragraph about PyTorch 2.6's defaults: the type says it
        detail = "" if isinstance(e, pickle.UnpicklingError) else (str(e).strip().splitlines() or [""])[0][:120]
        refuse(f"torch.load: {type(e).__name__}{': ' + detail if detail else ''}")
    if not isinstance(state, dict):
        refuse(f"it holds a {type(state).__name__}, not a dict")
    if state.get("format") != CHECKPOINT_FORMAT:
        refuse(f"format {state.get('format')!r}, this rsnl reads {CHECKPOINT_FORMAT}")
    wrong = [k for k, t in CHECKPOINT_KEYS.items() if not isinstance(state.get(k), t)]
    if wrong:
        refuse(f"missing or malformed: {', '.join(wrong)}")
    return state


def build_trainer(cfg: TrialConfig, clip: LoadedClip, bank: FeatureBank) -> Trainer:
    return Trainer(cfg, trial_data(cfg, bank), clip.model, clip.tokenizer, bank.classnames)
