"""Tiny real studies for the tune/ and analysis/ tests (plain functions; fixtures in conftest.py).

Everything is digits + rsnl-tiny (random init) on the CPU, a few epochs: the same code paths as a DTD
study, at a size CI can afford.
"""

from __future__ import annotations

import copy


def tiny_trial(cache_dir, **changes) -> dict:
    trial = {"dataset": "digits", "backbone": "rsnl-tiny", "pretrained": None, "shots": 8, "epochs": 3,
             "n_ctx": 4, "aug_views": 1, "device": "cpu", "cache_dir": str(cache_dir)}
    trial.update(changes)
    return trial


def grid_study(storage, cache_dir, name="grid", **trial_changes) -> dict:
    """An ablation in miniature: 2 variants x 2 noise rates x 2 seeds = 8 trials."""
    return {
        "name": name, "storage": str(storage), "trial": tiny_trial(cache_dir, **trial_changes),
        "search": {"kind": "grid", "params": {"noise_rate": {"grid": [0.25, 0.5]}, "seed": {"grid": [1, 2]}}},
        "variants": [{"name": "coop", "blocks": 1, "selector": "none", "loss": "ce"},
                     {"name": "rsnl-m2", "blocks": 2, "selector": "gmm", "loss": "ce"}],
        "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": 2,
    }


def optuna_study(storage, cache_dir, name="search", num_samples=4, **trial_changes) -> dict:
    """An Optuna search whose suggestions are each scored on a group of 2 seeds."""
    return {
        "name": name, "storage": str(storage), "trial": tiny_trial(cache_dir, noise_rate=0.5, **trial_changes),
        "search": {"kind": "optuna", "num_samples": num_samples, "seed": 0,
                   "params": {"blocks": {"choice": [1, 2]}, "alpha_base": {"uniform": [0.05, 0.5]},
                              "alpha_rate": {"loguniform": [5.0, 100.0]}}},
        "group": {"seed": [1, 2]},
        "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": 2,
    }


def run(values: dict, **kw):
    """Parse and run a study dict in this process (Ray must be up); returns (ResultGrid, path, stats)."""
    from tune.run import run_study
    from rsnl.study import parse_study
    return run_study(parse_study(copy.deepcopy(values)), log=lambda *_: None, **kw)
