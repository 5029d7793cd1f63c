"""The original computational pattern of this method, re-implemented faithfully, for side-by-side timing.

The original code (CoOp / Dassl based) trains the prompt matrix like this, per epoch:

1. Selection pass: over the training loader (augmented views, batch 32, shuffled, drop_last), for every
   batch and without gradients, `image_encoder(image)` on the batch and the text features of every
   block, one text-encoder call per block on [C, 77] token embeddings (CoOp's CustomCLIP.forward rebuilds
   the prompts and runs the text encoder on every call, so every batch pays for them). From the
   collected (augmented) features: prompt similarity p_i = mean_b cos(f_i, t_{b, y~_i}), feature
   similarity within each noisy class, robust similarity G with alpha(epoch), a 2-component GMM per
   noisy class -> the kept samples. Samples that drop_last left out of the pass are kept.
2. Training pass: a loader over the kept samples (augmented, batch 32, shuffled, drop_last as Dassl does
   when there are at least 32); per batch `image_encoder(image)` (frozen: no graph), the text encoder
   once per block at the full 77-token context with gradients, ensemble logits = mean over blocks of
   s * f . t_b, cross-entropy on the batch, backward, SGD step; the lr schedule steps per epoch.
3. Test: the image tower on every test batch plus the per-block text encoder, at the end of training
   (Dassl's default), not every epoch.

It shares the open_clip model object and the PromptMatrix's `ctx` parameter with the fast path, so that
the two compute the same function on the same weights (tests/test_reference.py checks it), and it reuses
rsnl.similarity for the selection math and the trainer's optimiser settings. Nothing in it is slowed on
purpose: no_grad where the original has no graph, batch sizes as the original, fp32 on the CPU and the
same autocast as the fast path on CUDA (the original casts CLIP to fp16 there instead). Only the class
token at the end ('end', the protocol's default) is implemented.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from rsnl.features import train_transform
from rsnl.models import PromptMatrix, _project, _text_tower
from rsnl.noise import sample_noisy_fewshot
from rsnl.similarity import (
    alpha_schedule,
    feature_similarity,
    robust_similarity,
    select_clean,
    zscore_within,
)


class ReferenceTextEncoder(nn.Module):
    """CoOp's TextEncoder: token embeddings [N, 77, d] -> projected EOS features [N, D]."""

    def __init__(self, clip_model):
        super().__init__()
        object.__setattr__(self, "tower", _text_tower(clip_model))  # frozen, not a submodule

    def forward(self, prompts: torch.Tensor, tokenized: torch.Tensor) -> torch.Tensor:
        t = self.tower
        x = prompts + t.positional_embedding.to(prompts.dtype)
        x = t.transformer(x, attn_mask=t.attn_mask)  # the full causal 77 x 77 mask, no cut
        x = t.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokenized.argmax(dim=-1)]  # EOS has the highest id
        return _project(t, x)


class ReferencePrompts(nn.Module):
    """CoOp's PromptLearner for m blocks, class token at the end: [SOS] ctx_b [CLASS] . [EOS] + padding to 77.

    The context is the PromptMatrix's `ctx` parameter itself ([m, n_ctx, d], or [m, C, n_ctx, d] with csc).
    """

    def __init__(self, prompts: PromptMatrix, tokenizer, classnames):
        super().__init__()
        if prompts.position != "end":
            raise ValueError("the reference loop implements the class token at the end only")
        object.__setattr__(self, "matrix", prompts)
        emb = prompts.tower.token_embedding
        names = [c.replace("_", " ") for c in classnames]
        template = " ".join(["X"] * prompts.n_ctx)  # placeholders: their embeddings are replaced by ctx
        tokens = tokenizer([f"{template} {name}." for name in names])  # [C, 77]
        with torch.no_grad():
            embedded = emb(tokens.to(emb.weight.device))
        self.register_buffer("tokens", tokens.to(emb.weight.device), persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1], persistent=False)                   # SOS
        self.register_buffer("token_suffix", embedded[:, 1 + prompts.n_ctx:], persistent=False)   # CLASS . EOS pad

    def forward(self, block: int) -> torch.Tensor:
        """[C, 77, d] prompt embeddings of one block."""
        pm = self.matrix
        ctx = pm.ctx[block]
        if ctx.dim() == 2:  # shared context
            ctx = ctx.unsqueeze(0).expand(pm.num_classes, -1, -1)
        return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)


class ReferenceCLIP(nn.Module):
    """CoOp's CustomCLIP with m prompt blocks: every call runs the image tower and, per block, the text
    encoder at 77 tokens; logits are the mean over blocks of the block logits."""

    def __init__(self, clip_model, prompts: PromptMatrix, tokenizer, classnames):
        super().__init__()
        object.__setattr__(self, "clip", clip_model)
        self.prompt_learner = ReferencePrompts(prompts, tokenizer, classnames)
        self.text_encoder = ReferenceTextEncoder(clip_model)
        self.blocks = prompts.blocks

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp()

    def text_features(self) -> torch.Tensor:
        """[m, C, D], L2-normalised: one text-encoder call per block, in a loop."""
        pl = self.prompt_learner
        return torch.stack([F.normalize(self.text_encoder(pl(b), pl.tokens), dim=-1) for b in range(self.blocks)])

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen image tower (no graph: nothing in it requires grad)."""
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        text = self.text_features() if text is None else text
        per_block = torch.stack([image_features.to(t.dtype) @ t.T for t in text])  # [m, N, C]
        return self.logit_scale * per_block.mean(0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_features(images))


class AugmentedSamples(torch.utils.data.Dataset):
    """The few-shot training sample as images: (transformed image, noisy label, position in the sample).
    A fresh random augmentation on every load, as a data loader of the original gives."""

    def __init__(self, images, indices, labels, transform):
        self.images, self.indices, self.labels, self.transform = images, np.asarray(indices), np.asarray(labels), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.transform(self.images.load(int(self.indices[i]))), int(self.labels[i]), i


class ReferenceTrainer:
    """The original per-epoch loop (module docstring) for one trial config, on image files."""

    def __init__(self, cfg, dataset, clip, prompts: PromptMatrix | None = None, device="cpu", num_workers: int = 0,
                 amp: torch.dtype | None = None):
        self.cfg, self.device, self.amp = cfg, torch.device(device), amp
        model, tokenizer, classnames = clip.model.to(self.device), clip.tokenizer, dataset.classnames
        C = len(classnames)
        if prompts is None:
            prompts = PromptMatrix(model, tokenizer, classnames, blocks=cfg.blocks, n_ctx=cfg.n_ctx, csc=cfg.csc,
                                   generator=torch.Generator().manual_seed(cfg.seed)).to(self.device)
        self.prompts = prompts
        self.model = ReferenceCLIP(model, prompts, tokenizer, classnames).to(self.device)
        self.sample = sample_noisy_fewshot(dataset.train.labels, C, cfg.shots, cfg.noise_rate, cfg.noise_type, cfg.seed)
        self.train_set = AugmentedSamples(dataset.train, self.sample.indices, self.sample.labels,
                                          train_transform(clip.preprocess))
        self.test_images, self.preprocess = dataset.test, clip.preprocess
        self.optimizer = torch.optim.SGD([prompts.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.num_workers = num_workers
        self.epoch = 0

    def _lr_factor(self, epoch: int) -> float:  # the same schedule as rsnl.train.Trainer
        if epoch < self.cfg.warmup_epochs:
            return self.cfg.warmup_lr / self.cfg.lr
        return 0.5 * (1.0 + math.cos(math.pi * epoch / self.cfg.epochs))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    # -- loaders --------------------------------------------------------------------------------
    def loader(self, positions=None, drop_last: bool = True) -> DataLoader:
        data = self.train_set if positions is None else Subset(self.train_set, list(positions))
        return DataLoader(data, batch_size=self.cfg.batch_size, shuffle=True, drop_last=drop_last,
                          generator=self.generator, num_workers=self.num_workers)

    def selection_loader(self) -> DataLoader:
        return self.loader(drop_last=True)

    def training_loader(self, keep: np.ndarray) -> DataLoader:
        kept = np.flatnonzero(keep)
        return self.loader(kept, drop_last=len(kept) >= self.cfg.batch_size)

    # -- the pieces of a step (the benchmark times them one by one) ------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.image_features(images.to(self.device))

    @torch.no_grad()
    def score_batch(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Prompt similarity of a selection batch: mean over blocks of cos(f_i, t_{b, y~_i}); the text
        features are recomputed for the batch, as the original's model forward does."""
        with self._autocast():
            text = self.model.text_features()                                  # [m, C, D]
        y = labels.to(self.device)
        return (text[:, y].float() * feats.float().unsqueeze(0)).sum(-1).mean(0)   # [B]

    def text_step(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """Per-block text encoder with gradients, ensemble logits, CE, backward, SGD step."""
        with self._autocast():
            logits = self.model.logits(feats)
            loss = F.cross_entropy(logits.float(), labels.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def train_step(self, images, labels) -> float:
        return self.text_step(self.encode(images), labels)

    def select_batch(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encode(images)
        return feats, self.score_batch(feats, labels)

    def selection_from(self, positions, feats, scores, epoch: int) -> np.ndarray:
        """Robust similarity and GMM selection over the samples the selection pass saw."""
        n = len(self.train_set)
        keep = np.ones(n, dtype=bool)  # samples dropped by drop_last keep their label
        pos = np.asarray(positions)
        labels = self.sample.labels[pos]
        alpha = alpha_schedule(epoch, self.cfg.alpha_base, self.cfg.alpha_rate)
        g = robust_similarity(zscore_within(scores, labels), feature_similarity(feats, labels), alpha)
        keep[pos] = select_clean(g, labels, self.cfg.selector, threshold=self.cfg.gmm_threshold,
                                 ratio=self.cfg.select_ratio, reg_covar=self.cfg.gmm_reg_covar, seed=self.cfg.seed)
        return keep

    # -- an epoch ---------------------------------------------------------------------------------
    def selection_pass(self, epoch: int) -> np.ndarray:
        pos, feats, scores = [], [], []
        for images, labels, p in self.selection_loader():
            f, s = self.select_batch(images, labels)
            pos.append(p.numpy())
            feats.append(f.cpu())
            scores.append(s.cpu().numpy())
        return self.selection_from(np.concatenate(pos), torch.cat(feats), np.concatenate(scores), epoch)

    def train_epoch(self) -> dict:
        start = time.perf_counter()
        keep = self.selection_pass(self.epoch)
        total, seen = 0.0, 0
        for images, labels, _ in self.training_loader(keep):
            total += self.train_step(images, labels) * len(labels)
            seen += len(labels)
        self.scheduler.step()
        metrics = {"epoch": self.epoch, "train_loss": total / max(seen, 1), "kept_frac": float(keep.mean()),
                   "steps": math.ceil(seen / self.cfg.batch_size), "epoch_seconds": time.perf_counter() - start}
        self.epoch += 1
        return metrics

    @torch.no_grad()
    def test_accuracy(self, batch_size: int = 100) -> float:
        """End-of-training test: the image tower on the test set, per-block text per batch."""
        images = self.test_images
        correct = 0
        for s in range(0, len(images), batch_size):
            idx = range(s, min(s + batch_size, len(images)))
            x = torch.stack([self.preprocess(images.load(i)) for i in idx])
            with self._autocast():
                pred = self.model(x.to(self.device)).argmax(-1).cpu().numpy()
            correct += int((pred == images.labels[list(idx)]).sum())
        return 100.0 * correct / max(len(images), 1)
