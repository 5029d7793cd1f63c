"""Study configs: validated YAML that says what a study runs (docs/studies.md).

A study is trial defaults + a search (grid, optuna or random over TrialConfig keys) + optionally
named variants (grid only) and a group of settings that every trial runs in turn (objective = the
group mean). Everything is checked here, before Ray starts, with one line naming the key.
This module does not import Ray; `param_space()` builds Tune domains lazily.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsnl.config import TrialConfig, _suggest, load_yaml, parse_overrides
from rsnl.errors import ConfigError
from rsnl.files import is_weights_path

CONFIG_DIR = Path(__file__).parent / "configs"
SEARCH_KINDS = ("grid", "optuna", "random")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "int")
METRICS = ("val_acc", "test_acc", "train_loss", "train_acc", "kept_frac", "select_precision", "select_recall",
           "noise_auroc")
STUDY_KEYS = ("name", "description", "storage", "trial", "search", "variants", "group", "objective", "asha",
              "resources", "max_concurrent", "reuse_actors", "max_failures")
SEARCH_KEYS = ("kind", "num_samples", "seed", "params")
OBJECTIVE_KEYS = ("metric", "mode")
ASHA_KEYS = ("grace_period", "reduction_factor")
RESOURCE_KEYS = ("cpu", "gpu")


@dataclass
class StudyConfig:
    name: str
    trial: dict[str, Any]
    kind: str = "grid"
    params: dict[str, dict] = field(default_factory=dict)
    num_samples: int = 1
    search_seed: int = 0
    variants: list[dict] = field(default_factory=list)
    group: dict[str, list] = field(default_factory=dict)
    metric: str = "val_acc"
    mode: str = "max"
    asha: dict | None = None
    cpu: float = 1.0
    gpu: float = 0.0
    max_concurrent: int = 0          # 0: as many as resources allow
    reuse_actors: bool = True
    max_failures: int = 2
    storage: str = "./results"
    description: str = ""

    # -- derived ---------------------------------------------------------------------------
    @property
    def group_members(self) -> list[dict]:
        """The cross product of the group's values, in a stable order ([{}] without a group)."""
        keys = list(self.group)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.group[k] for k in keys))] or [{}]

    def grid_points(self) -> list[dict]:
        """Every trial override of a grid study (variants x grid axes)."""
        axes = {k: spec["grid"] for k, spec in self.params.items()}
        if self.variants:
            axes = {"variant": self.variants, **axes}
        keys = list(axes)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))] or [{}]

    def num_trials(self) -> int:
        return len(self.grid_points()) if self.kind == "grid" else self.num_samples

    def storage_path(self) -> str:
        s = self.storage
        return s if "://" in s else str(Path(os.path.expanduser(s)).resolve())

    def experiment_path(self) -> str:
        return f"{self.storage_path().rstrip('/')}/{self.name}"

    # -- trial configs -----------------------------------------------------------------------
    def trial_configs(self, overrides: dict) -> list[tuple[str, TrialConfig]]:
        """(member name, config) for every group member of one trial's overrides."""
        base = {**self.trial, **_flatten_variant(overrides)}
        return [(member_name(m), TrialConfig.from_dict({**base, **m})) for m in self.group_members]

    def corner_overrides(self) -> list[dict]:
        """Overrides that reach every value a trial can see: grid points, or the ends of each range."""
        if self.kind == "grid":
            return self.grid_points()
        out = [{}]
        for key, spec in self.params.items():
            (dist, values), = spec.items()
            ends = values if dist == "choice" else [values[0], values[1]]
            out += [{key: v} for v in ends]
        return out

    def validate_trials(self) -> list[TrialConfig]:
        """Builds every reachable trial config (cheap); raises ConfigError on the first bad one."""
        seen = [TrialConfig.from_dict(self.trial)]  # the defaults too, even where every trial overrides one
        for o in self.corner_overrides():
            for _, cfg in self.trial_configs(o):
                seen.append(cfg)
        return seen

    # -- Tune ------------------------------------------------------------------------------
    def param_space(self) -> dict:
        """Tune's param_space: search domains for the study's params, constants for the rest."""
        from ray import tune
        space: dict[str, Any] = {}
        for key, spec in self.params.items():
            (dist, v), = spec.items()
            space[key] = {
                "grid": lambda: tune.grid_search(list(v)),
                "choice": lambda: tune.choice(list(v)),
                "uniform": lambda: tune.uniform(v[0], v[1]),
                "loguniform": lambda: tune.loguniform(v[0], v[1]),
                "int": lambda: tune.randint(v[0], v[1] + 1),  # inclusive upper bound in our YAML
            }[dist]()
        if self.variants:
            space["variant"] = tune.grid_search(self.variants_costliest_first())
        return space

    def variants_costliest_first(self) -> list[dict]:
        """Variants by their selector's cost per epoch (optimal transport's Sinkhorn rounds, then a GMM
        per class, then none), then by prompt blocks (the text tower's cost grows with them): started
        longest-first, the trials of a grid finish closer together on a fixed number of slots."""
        base = TrialConfig.from_dict(self.trial)
        selector_cost = {"ot": 2, "gmm": 1, "ratio": 1, "none": 0}

        def cost(v: dict) -> tuple:
            return (selector_cost.get(v.get("selector", base.selector), 1), int(v.get("blocks", base.blocks)))
        return sorted(copy.deepcopy(self.variants), key=cost, reverse=True)


def member_name(member: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in member.items()) or "single"


def _flatten_variant(overrides: dict) -> dict:
    """A variant is a named set of trial keys; the name itself is not a trial key."""
    out = {k: v for k, v in overrides.items() if k != "variant"}
    variant = overrides.get("variant")
    if variant:
        out.update({k: v for k, v in variant.items() if k != "name"})
    return out


# --- loading and validation -------------------------------------------------------------------

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


def _mapping(value, where: str, allowed: tuple) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            raise ConfigError(f"{where}.{k}: unknown key{_suggest(k, allowed)}; allowed: {', '.join(allowed)}")
    return value


def _number(value, where: str, lo=None, integer=False, lo_open=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ConfigError(f"{where}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{where}: {value!r} is out of range; allowed: {'>' if lo_open else '>='} {lo}")
    return value


def check_gpu_request(gpu, where: str = "resources.gpu") -> float:
    """Fractions below 1 share a GPU (0.25 -> four trials per GPU); above 1, whole GPUs only."""
    _number(gpu, where, lo=0)
    if gpu > 1 and float(gpu) != int(gpu):
        raise ConfigError(f"{where}: {gpu!r} is not allowed; use a fraction in (0, 1] to share a GPU "
                          f"(0.25 = four trials per GPU) or a whole number of GPUs")
    return float(gpu)


def parse_study(values: dict) -> StudyConfig:
    values = _mapping(values, "study", STUDY_KEYS)
    name = values.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ConfigError(f"name: must be a non-empty folder name without '/', got {name!r}")
    trial = _mapping(values.get("trial"), "trial", tuple(TrialConfig.keys()))
    search = _mapping(values.get("search"), "search", SEARCH_KEYS)
    kind = search.get("kind", "grid")
    if kind not in SEARCH_KINDS:
        raise ConfigError(f"search.kind: {kind!r} is not allowed{_suggest(kind, SEARCH_KINDS)}; "
                          f"allowed: {', '.join(SEARCH_KINDS)}")
    params = _mapping(search.get("params"), "search.params", tuple(TrialConfig.keys()))
    for key, spec in params.items():
        _check_distribution(key, spec, kind)
    if kind != "grid" and not params:
        raise ConfigError(f"search.params: empty; an {kind} search needs at least one parameter "
                          f"(e.g. alpha_base: {{uniform: [0.05, 0.5]}})")
    num_samples = _number(search.get("num_samples", 1), "search.num_samples", lo=1, integer=True)
    seed = _number(search.get("seed", 0), "search.seed", lo=0, integer=True)

    variants = values.get("variants") or []
    if variants and kind != "grid":
        raise ConfigError("variants: only a grid study has variants; list them as a grid axis or drop them")
    if not isinstance(variants, list):
        raise ConfigError("variants: must be a list of {name: ..., <trial key>: value} mappings")
    names = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise ConfigError(f"variants[{i}]: must be a mapping with a 'name' and trial keys")
        _mapping({k: x for k, x in v.items() if k != "name"}, f"variants[{i}]", tuple(TrialConfig.keys()))
        names.append(v["name"])
    if len(set(names)) != len(names):
        raise ConfigError(f"variants: names must be unique, got {names}")

    group = _mapping(values.get("group"), "group", tuple(TrialConfig.keys()))
    for key, vals in group.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"group.{key}: must be a non-empty list of values")
        if key in params:
            raise ConfigError(f"group.{key}: is also a search parameter; a key is either searched or grouped")

    objective = _mapping(values.get("objective"), "objective", OBJECTIVE_KEYS)
    metric = objective.get("metric", "val_acc")
    if metric not in METRICS:
        raise ConfigError(f"objective.metric: {metric!r} is not reported{_suggest(metric, METRICS)}; "
                          f"allowed: {', '.join(METRICS)}")
    mode = objective.get("mode", "min" if metric == "train_loss" else "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"objective.mode: {mode!r} is not allowed; allowed: max, min")

    asha = values.get("asha")
    if asha is not None:
        asha = _mapping(asha, "asha", ASHA_KEYS)
        if len(StudyConfig(name, trial, group=group).group_members) > 1:
            raise ConfigError("asha: cannot stop trials early that evaluate a group (the objective is the mean "
                              "over all members); drop asha or the group")
        _number(asha.get("grace_period", 1), "asha.grace_period", lo=1, integer=True)
        _number(asha.get("reduction_factor", 2), "asha.reduction_factor", lo=1, integer=True, lo_open=True)

    resources = _mapping(values.get("resources"), "resources", RESOURCE_KEYS)
    cpu = float(_number(resources.get("cpu", 1), "resources.cpu", lo=0, lo_open=True))
    gpu = check_gpu_request(resources.get("gpu", 0))
    max_concurrent = _number(values.get("max_concurrent", 0) or 0, "max_concurrent", lo=0, integer=True)
    max_failures = _number(values.get("max_failures", 2), "max_failures", lo=0, integer=True)
    reuse = values.get("reuse_actors", True)
    if not isinstance(reuse, bool):
        raise ConfigError(f"reuse_actors: must be true or false, got {reuse!r}")
    storage = values.get("storage") or "./results"
    if not isinstance(storage, str):
        raise ConfigError(f"storage: must be a folder or URI, got {storage!r}")

    trial, variants, group, params = (_absolute_paths(trial), [_absolute_paths(v) for v in variants],
                                      _absolute_paths(group), _absolute_paths(params))
    study = StudyConfig(name=name.strip(), trial=dict(trial), kind=kind, params=dict(params),
                        num_samples=num_samples, search_seed=seed, variants=list(variants), group=dict(group),
                        metric=metric, mode=mode, asha=asha, cpu=cpu, gpu=gpu, max_concurrent=max_concurrent,
                        reuse_actors=reuse, max_failures=max_failures, storage=storage,
                        description=str(values.get("description") or ""))
    study.validate_trials()
    return study


PATH_KEYS = ("noise_file", "data_root", "cache_dir", "pretrained")


def _absolute(key: str, value):
    """A path value made absolute here, in the driver: trials run in their own folders (and on other
    machines), where a relative path would point elsewhere. pretrained counts only when it is a file."""
    if isinstance(value, list):
        return [_absolute(key, v) for v in value]
    if isinstance(value, dict):  # a search distribution {choice: [...]}
        return {k: _absolute(key, v) for k, v in value.items()}
    if not isinstance(value, str) or not value.strip() or "://" in value:
        return value
    if key == "pretrained" and not is_weights_path(value):
        return value  # a tag such as openai or fashion-mnist
    return os.path.abspath(os.path.expanduser(value))


def _absolute_paths(values: dict) -> dict:
    return {k: (_absolute(k, v) if k in PATH_KEYS else v) for k, v in values.items()}


def _check_distribution(key: str, spec, kind: str) -> None:
    where = f"search.params.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: must be one of {{{'|'.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (dist, values), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {dist!r} is not a distribution{_suggest(dist, DISTRIBUTIONS)}; "
                          f"allowed: {', '.join(DISTRIBUTIONS)}")
    if dist == "grid" and kind != "grid":
        raise ConfigError(f"{where}: a grid axis cannot be combined with an {kind} search (Tune refuses "
                          f"grid_search beside a searcher); use choice: [...] or put the values in group")
    if dist != "grid" and kind == "grid":
        raise ConfigError(f"{where}: a grid study takes grid: [values] only, got {dist}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{dist}: must be a non-empty list")
    if dist in ("uniform", "loguniform", "int"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}.{dist}: must be [low, high] numbers, got {values!r}")
        lo, hi = values
        if not lo < hi:
            raise ConfigError(f"{where}.{dist}: low {lo} must be below high {hi}")
        if dist == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}.loguniform: low must be > 0, got {lo}")
        if dist == "int" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}.int: bounds must be integers, got {values!r}")


def with_runtime_options(study: StudyConfig, **opts) -> StudyConfig:
    """Apply launch.py's command-line options (None means not given)."""
    changes = {k: v for k, v in opts.items() if v is not None}
    if "gpu" in changes:
        changes["gpu"] = check_gpu_request(changes["gpu"], "--gpus-per-trial")
    if "cpu" in changes:
        changes["cpu"] = float(_number(changes["cpu"], "--cpus-per-trial", lo=0, lo_open=True))
    if "max_concurrent" in changes:
        _number(changes["max_concurrent"], "--max-concurrent", lo=0, integer=True)
    if "num_samples" in changes:
        if study.kind == "grid":
            raise ConfigError("--num-samples: a grid study runs each grid point once; set it for optuna or random")
        _number(changes["num_samples"], "--num-samples", lo=1, integer=True)
    if "name" in changes and (not changes["name"] or "/" in changes["name"]):
        raise ConfigError(f"--name: must be a non-empty folder name without '/', got {changes['name']!r}")
    return dataclasses.replace(study, **changes)


def smoke(study: StudyConfig) -> StudyConfig:
    """The same study shape on digits + rsnl-tiny, 2 epochs and a handful of trials (for CI)."""
    trial = {**study.trial, "dataset": "digits", "data_root": None, "backbone": "rsnl-tiny", "pretrained": None,
             "epochs": 2, "aug_views": 1, "shots": min(int(study.trial.get("shots", 16)), 8), "n_ctx": 4,
             "device": "cpu"}
    params = {k: ({"grid": v["grid"][:2]} if "grid" in v else v) for k, v in study.params.items()}
    return dataclasses.replace(study, name=f"{study.name}-smoke", trial=trial, params=params,
                               variants=study.variants[:2], group={k: v[:1] for k, v in study.group.items()},
                               num_samples=min(study.num_samples, 2), gpu=0.0, cpu=1.0)
