"""rsnl: robust-similarity prompt learning for CLIP on few-shot data with noisy labels.

The library (this package) never imports Ray; the study layer lives in `tune/`. The method and the
protocol are in docs/method.md. Modules, one job each:
  config      the validated trial configuration and the allowed values of its choice keys
  errors      the one-line errors a user fixes
  data        datasets (CoOp split JSON, torchvision DTD, Fashion-MNIST, digits, image folders)
  noise       few-shot sampling with injected label noise
  manifest    noise manifests: a trial's draw as a file, and its replay
  models      open_clip loading (`load_clip`) and the prompt matrix (text side)
  pretrain    the stand-in VLM rsnl pretrains on Fashion-MNIST (also `python -m rsnl.pretrain`)
  features    frozen image features, computed once, in a content-keyed disk cache
  device      device and precision choice
  inputs      a trial's inputs: checks before any model, model and features, the noisy sample
  similarity  prompt / feature / robust similarity and clean-sample selection
  ot          PromptOT: NLPrompt's optimal-transport selection
  zeroshot    the zero-shot baseline every trial reports
  trainer     the epoch loop, losses and checkpoints
  members     a study trial's members trained side by side (one text-tower pass per step for all)
  train       the command line for one trial (`python -m rsnl.train`)
  files       the cache folder, atomic writes and locks
  testing     generated image datasets for tests and benchmarks

The names below are the public API; they are imported on first use, so `import rsnl.config` stays
light (no torch) for tools that only read configs.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TrialConfig": "rsnl.config",
    "ConfigError": "rsnl.errors", "DataError": "rsnl.errors", "ModelError": "rsnl.errors",
    "load_dataset": "rsnl.data",
    "sample_noisy_fewshot": "rsnl.noise",
    "load_clip": "rsnl.models", "PromptMatrix": "rsnl.models",
    "load_inputs": "rsnl.inputs", "trial_data": "rsnl.inputs",
    "alpha_schedule": "rsnl.similarity", "prompt_similarity": "rsnl.similarity",
    "feature_similarity": "rsnl.similarity", "robust_similarity": "rsnl.similarity",
    "select_clean": "rsnl.similarity", "selection_metrics": "rsnl.similarity",
    "select_by_ot": "rsnl.ot",
    "Trainer": "rsnl.trainer", "build_trainer": "rsnl.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rsnl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
