"""The trainer: one trial's epoch loop, its losses and its checkpoints.

Per epoch e: the robust similarity G with alpha(e) from the prompts as they stand -> clean selection
-> loss on the kept samples with their noisy labels, in batches of precomputed image features (the
image tower never runs here) -> evaluation -> one metrics dict. The method is in docs/method.md.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass

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
from rsnl.models import LoadedClip, PromptMatrix, ensemble_logits
from rsnl.ot import ot_plan, ot_selection
from rsnl.similarity import (alpha_schedule, block_cosine, class_cosine, clean_auroc, feature_similarity,
                             prompt_similarity, robust_similarity, select_clean, selection_metrics)
from rsnl.zeroshot import zeroshot_accuracy

# keys that may differ between a checkpoint and the run that continues it (where, not what, it computes)
RUNTIME_KEYS = ("device", "precision", "cache_dir", "num_workers", "feature_batch_size", "data_root", "download",
                "batch_members")


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


@dataclass
class Batch:
    """One training step's samples: rows of the sample, their augmented views (None: the un-augmented
    features), the loss they take, and where the batch starts in its phase (for messages)."""
    rows: torch.Tensor
    views: torch.Tensor | None
    loss: str
    start: int


@dataclass
class EpochRun:
    """One member's epoch in progress: its selection, its batches, and the running loss and accuracy."""
    epoch: int
    lr: float
    selection: dict
    batches: list[Batch]
    start: float  # time.perf_counter() at its start
    total: float = 0.0
    seen: int = 0
    correct: torch.Tensor | int = 0


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
        self.feature_auroc = clean_auroc(self.feature_sim, data.sample.is_noisy)  # and so is its AUROC
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
    def select(self, epoch: int, text: torch.Tensor | None = None, plan: tuple | None = None) -> dict:
        """This epoch's clean samples from the prompts as they stand: {alpha, score, keep, diagnostics}.
        score ranks the samples: G, or Q_{i, y~_i} for the OT selector (where alpha has no role and is NaN).
        diagnostics: how well each side of G alone separates clean from noisy samples, and how far the
        blocks differ (the prompt side is computed for every selector, so baselines report it too).
        `text`: the prompts' text features when already computed (members side by side share the pass);
        `plan`: for the OT selector, (Q, residual) of ot_plan(self.ot_probs(text)) when already computed
        (members side by side solve theirs at once)."""
        cfg = self.cfg
        text = self.prompts.text_features() if text is None else text
        prompt_sim = prompt_similarity(self.train_f, text, self.data.sample.labels)
        noisy = self.data.sample.is_noisy
        diagnostics = {"feature_auroc": self.feature_auroc, "prompt_auroc": clean_auroc(prompt_sim, noisy),
                       "block_cosine": block_cosine(text)}
        if cfg.selector == "ot":
            q, self.ot_residual = plan if plan is not None else ot_plan(self.ot_probs(text), cfg.ot_eps, cfg.ot_cost)
            keep, score = ot_selection(q, self.data.sample.labels)
            return {"alpha": float("nan"), "score": score, "keep": keep, "diagnostics": diagnostics}
        alpha = alpha_schedule(max(epoch - cfg.alpha_lag, 0), cfg.alpha_base, cfg.alpha_rate)
        score = robust_similarity(prompt_sim, self.feature_sim, alpha)
        keep = select_clean(score, self.data.sample.labels, cfg.selector, threshold=cfg.gmm_threshold,
                            ratio=cfg.select_ratio, reg_covar=cfg.gmm_reg_covar, max_iter=cfg.gmm_max_iter,
                            tol=cfg.gmm_tol, seed=cfg.seed)
        return {"alpha": alpha, "score": score, "keep": keep, "diagnostics": diagnostics}

    @torch.no_grad()
    def ot_probs(self, text: torch.Tensor) -> torch.Tensor:
        """The class probabilities [N, C] that PromptOT transports, in float64, from the autocast pass of
        the trained path (without autocast that is the selection's `text` itself)."""
        with self._autocast():
            amp_text = text if self.amp is None else self.prompts.text_features()
            return ensemble_logits(self.train_f, amp_text, self.logit_scale).double().softmax(-1)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, labels, text: torch.Tensor | None = None) -> float:
        """Test-style accuracy on `feats`; `text` the autocast text features when already computed."""
        with self._autocast():
            text = self.prompts.text_features() if text is None else text
            pred = torch.einsum("nd,bcd->nc", feats.to(text.dtype), text).argmax(-1)
        return 100.0 * (pred.cpu().numpy() == np.asarray(labels)).mean()

    # -- one epoch in three pieces: plan, steps, metrics. train_epoch runs them for this member alone;
    # rsnl/members.py runs them for several members side by side, sharing the text tower's passes.
    def begin_epoch(self, text: torch.Tensor | None = None, plan: tuple | None = None) -> "EpochRun":
        """The epoch's selection (`text`, `plan`: see select) and its batches: the order and the views are
        drawn here, all at once, from the member's own generator (the same draws, in the same order, as
        batch by batch)."""
        cfg, e = self.cfg, self.epoch
        start = time.perf_counter()
        selection = self.select(e, text, plan)
        keep = selection["keep"]
        # kept samples with the trial's loss; with ce+mae (NLPrompt) then the rest with MAE, in batches of
        # their own as NLPrompt's trainer does
        phases = [(keep, "ce" if cfg.loss == "ce+mae" else cfg.loss)]
        if cfg.loss == "ce+mae":
            phases.append((~keep, "mae"))
        batches = []
        for mask, loss_kind in phases:
            kept = torch.as_tensor(np.flatnonzero(mask), device=self.device)
            order = kept[torch.randperm(len(kept), generator=self.generator).to(self.device)]
            view = (torch.randint(self.views.shape[0], (len(kept),), generator=self.generator).to(self.device)
                    if self.views is not None else None)
            # drop_last as the original code's loader: the last incomplete batch goes when a full one exists
            full = len(order) >= cfg.batch_size
            end = len(order) - len(order) % cfg.batch_size if cfg.drop_last and full else len(order)
            for s in range(0, end, cfg.batch_size):
                batches.append(Batch(order[s: s + cfg.batch_size],
                                     None if view is None else view[s: s + cfg.batch_size], loss_kind, s))
        self.prompts.train()
        return EpochRun(e, self.optimizer.param_groups[0]["lr"], selection, batches, start)

    def batch_loss(self, run: "EpochRun", batch: "Batch", text: torch.Tensor) -> torch.Tensor:
        """The loss of one batch for text features `text` (computed with gradients, under this member's
        autocast by the caller); counts the batch's correct predictions."""
        cfg, idx = self.cfg, batch.rows
        f = self.views[batch.views, idx] if batch.views is not None else self.train_f[idx]
        y = self.labels[idx]
        logits = ensemble_logits(f, text, self.logit_scale)
        loss = noisy_label_loss(logits, y, batch.loss, cfg.gce_q)
        if cfg.loss == "ce+mae" and batch.loss == "mae":
            loss = loss / 2  # NLPrompt's MAE is mean(1 - p_y), half of rsnl's mae
        run.correct = run.correct + (logits.detach().argmax(-1) == y).sum()  # a tensor: no sync per step
        return loss

    def count_loss(self, run: "EpochRun", batch: "Batch", value: float) -> None:
        """The batch's loss value into the epoch's mean; a non-finite one stops the run before any update."""
        if not math.isfinite(value):
            raise NonFiniteError(f"epoch {run.epoch}: train_loss is {value} (batch starting at {batch.start}); "
                                 f"lower lr or use precision fp32")
        run.total += value * len(batch.rows)
        run.seen += len(batch.rows)

    def optimizer_step(self) -> None:
        """The update from the gradients that backward left (scaled under fp16)."""
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def finish_epoch(self, run: "EpochRun", text: torch.Tensor | None = None, seconds: float | None = None) -> dict:
        """The epoch's metrics after its steps: val and test accuracy from one autocast text pass (`text`
        when already computed), the selection's figures. `seconds`: the epoch's share of a side-by-side
        group's wall time (default: this member's own wall time since begin_epoch)."""
        cfg = self.cfg
        self.scheduler.step()
        self.prompts.eval()
        if text is None:
            with torch.no_grad(), self._autocast():
                text = self.prompts.text_features()
        selection = run.selection
        metrics = {
            "epoch": run.epoch,
            "lr": run.lr,
            "train_loss": run.total / max(run.seen, 1),
            "train_acc": 100.0 * int(run.correct) / max(run.seen, 1),
            "val_acc": self.accuracy(self.val_f, self.data.val_sample.labels, text),
            "test_acc": self.accuracy(self.test_f, self.data.test_labels, text),
            "class_cosine": class_cosine(text),
            "zeroshot_acc": self.zeroshot_acc,
            "alpha": selection["alpha"],
            **selection_metrics(selection["keep"], self.data.sample.is_noisy, selection["score"]),
            **selection["diagnostics"],
            **({"ot_residual": self.ot_residual} if cfg.selector == "ot" else {}),
            "epoch_seconds": time.perf_counter() - run.start if seconds is None else seconds,
        }
        # Plain Python numbers: checkpoints are read back with weights_only=True, which refuses numpy scalars.
        metrics = {k: int(v) if k == "epoch" else float(v) for k, v in metrics.items()}
        self.epoch += 1
        self.history.append(metrics)
        return metrics

    def train_step(self, run: "EpochRun", batch: "Batch") -> torch.Tensor:
        """One training step of this member alone (rsnl.members.step_together: several side by side)."""
        with self._autocast():
            loss = self.batch_loss(run, batch, self.prompts.text_features())
        self.count_loss(run, batch, loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.optimizer_step()
        return loss

    def train_epoch(self) -> dict:
        """One epoch of this member alone: the reference path (members side by side: rsnl/members.py)."""
        run = self.begin_epoch()
        for batch in run.batches:
            self.train_step(run, batch)
        return self.finish_epoch(run)

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
