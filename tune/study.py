"""The launcher's side of a study: presets, command-line options, the smoke version, Tune's search space.

The study format itself (parsing, checks, the stored file) is rsnl.study; this module adds what only the
launcher needs. It does not import Ray until `param_space()` builds Tune's domains.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rsnl.config import _suggest, load_yaml, parse_overrides
from rsnl.errors import ConfigError
from rsnl.study import STUDY_KEYS, StudyConfig, check_gpu_request, check_name, check_number, parse_study

CONFIG_DIR = Path(__file__).parent / "configs"


def list_presets() -> dict[str, str]:
    """name -> description of the YAML studies shipped in tune/configs."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        out[path.stem] = (load_yaml(path).get("description") or "").strip()
    return out


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        presets = list(list_presets())
        raise ConfigError(f"--preset: {name!r} is not a preset{_suggest(name, presets)}; "
                          f"allowed: {', '.join(presets)}")
    return path


def load_study(path=None, preset: str | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML (or a preset) and apply `--set` overrides; see `parse_study`."""
    values = load_yaml(path if path is not None else preset_path(preset or "dtd-ablation"))
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(values, key, value)
    return parse_study(values)


def _set_dotted(values: dict, key: str, value) -> None:
    """--set trial.epochs=5, --set search.num_samples=4; a bare trial key means trial.<key>."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] not in STUDY_KEYS:
        parts = ["trial", parts[0]]
    node = values
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a mapping")
    node[parts[-1]] = value


def param_space(study: StudyConfig) -> dict:
    """Tune's param_space: search domains for the study's params, constants for the rest."""
    from ray import tune
    space: dict[str, Any] = {}
    for key, spec in study.params.items():
        (dist, v), = spec.items()
        space[key] = {
            "grid": lambda: tune.grid_search(list(v)),
            "choice": lambda: tune.choice(list(v)),
            "uniform": lambda: tune.uniform(v[0], v[1]),
            "loguniform": lambda: tune.loguniform(v[0], v[1]),
            "int": lambda: tune.randint(v[0], v[1] + 1),  # inclusive upper bound in our YAML
        }[dist]()
    if study.variants:
        space["variant"] = tune.grid_search(study.variants_costliest_first())
    return space


def with_runtime_options(study: StudyConfig, **opts) -> StudyConfig:
    """Apply launch.py's command-line options (None means not given)."""
    changes = {k: v for k, v in opts.items() if v is not None}
    if "gpu" in changes:
        changes["gpu"] = check_gpu_request(changes["gpu"], "--gpus-per-trial")
    if "cpu" in changes:
        changes["cpu"] = float(check_number(changes["cpu"], "--cpus-per-trial", lo=0, lo_open=True))
    if "max_concurrent" in changes:
        check_number(changes["max_concurrent"], "--max-concurrent", lo=0, integer=True)
    if "num_samples" in changes:
        if study.kind == "grid":
            raise ConfigError("--num-samples: a grid study runs each grid point once; set it for optuna or random")
        check_number(changes["num_samples"], "--num-samples", lo=1, integer=True)
    if "name" in changes:
        changes["name"] = check_name(changes["name"], "--name")
    return dataclasses.replace(study, **changes)


def smoke(study: StudyConfig) -> StudyConfig:
    """The same study shape on digits + rsnl-tiny, 2 epochs and a handful of trials (for CI)."""
    trial = {**study.trial, "dataset": "digits", "data_root": None, "backbone": "rsnl-tiny", "pretrained": None,
             "epochs": 2, "aug_views": 1, "shots": min(int(study.trial.get("shots", 16)), 8), "n_ctx": 4,
             "device": "cpu"}
    params = {k: ({"grid": v["grid"][:2]} if "grid" in v else v) for k, v in study.params.items()}
    variants = study.variants[:2]
    kept = {v["name"] for v in variants}
    pairs = [p for p in study.pairs if set(p) <= kept]
    return dataclasses.replace(study, name=f"{study.name}-smoke", trial=trial, params=params,
                               variants=variants, pairs=pairs, group={k: v[:1] for k, v in study.group.items()},
                               num_samples=min(study.num_samples, 2), gpu=0.0, cpu=1.0)
