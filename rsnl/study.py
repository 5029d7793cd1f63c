"""The study format: what a study runs, and how its results lie on disk (docs/studies.md).

One module owns it: the study config and its checks, the stored study file, member names, the record
each trial folder keeps of the configs it ran, trial folder names, the search distributions of the
Optuna record and the metric names. Everything is checked here, before Ray starts, with one line naming
the key. No Ray, no torch: the analysis layer reads studies through this module alone.

Layout of an experiment (STORAGE/NAME, a folder or a URI):
    rsnl_study.yaml          the study as it runs (storage recorded absolute)
    optuna.db                the Optuna record of every finished trial (what optuna-dashboard shows)
    <trial folder>/          Tune's params.json, result.json, events, checkpoints, error.txt, plus
        rsnl_trial.json      the trial id, its params, the resolved TrialConfig of every member, and
                             which members trained side by side
        noise_manifest*.csv  the draw of each member
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsnl import storage
from rsnl.config import TrialConfig, _suggest
from rsnl.errors import ConfigError
from rsnl.files import is_weights_path
from rsnl.manifest import MANIFEST

STUDY_FILE = "rsnl_study.yaml"
TRIAL_FILE = "rsnl_trial.json"
RECORD_FILE = "optuna.db"
SEARCH_KINDS = ("grid", "optuna", "random")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "int")
# What a trial reports every epoch (rsnl.trainer.Trainer.train_epoch; a test keeps the two in step).
EPOCH_METRICS = ("epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc", "zeroshot_acc", "alpha",
                 "kept_frac", "select_precision", "select_recall", "noise_auroc", "feature_auroc", "prompt_auroc",
                 "block_cosine", "class_cosine", "ot_residual", "epoch_seconds")
OBJECTIVE_METRICS = ("val_acc", "test_acc", "train_loss", "train_acc", "kept_frac", "select_precision",
                     "select_recall", "noise_auroc")
STUDY_KEYS = ("name", "description", "storage", "trial", "search", "variants", "group", "objective", "asha",
              "resources", "max_concurrent", "reuse_actors", "max_failures", "pairs")
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
    pairs: list[list[str]] = field(default_factory=list)  # [variant, reference]: paired differences to report

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
        return storage.absolute(self.storage)

    def experiment_path(self) -> str:
        return storage.join(self.storage_path(), self.name)

    # -- trial configs -----------------------------------------------------------------------
    def trial_configs(self, overrides: dict) -> list[tuple[str, TrialConfig]]:
        """(member name, config) for every group member of one trial's overrides."""
        base = {**self.trial, **flatten_variant(overrides)}
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

    # -- order -----------------------------------------------------------------------------
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
    """A group member's name: 'noise_rate=0.5,seed=1' ('single' without a group)."""
    return ",".join(f"{k}={v}" for k, v in member.items()) or "single"


def flatten_variant(overrides: dict) -> dict:
    """A variant is a named set of trial keys; the name itself is not a trial key."""
    out = {k: v for k, v in overrides.items() if k != "variant"}
    variant = overrides.get("variant")
    if variant:
        out.update({k: v for k, v in variant.items() if k != "name"})
    return out


# --- parsing and validation -------------------------------------------------------------------

def _mapping(value, where: str, allowed: tuple) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            raise ConfigError(f"{where}.{k}: unknown key{_suggest(k, allowed)}; allowed: {', '.join(allowed)}")
    return value


def check_number(value, where: str, lo=None, integer=False, lo_open=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ConfigError(f"{where}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{where}: {value!r} is out of range; allowed: {'>' if lo_open else '>='} {lo}")
    return value


def check_gpu_request(gpu, where: str = "resources.gpu") -> float:
    """Fractions below 1 share a GPU (0.25 -> four trials per GPU); above 1, whole GPUs only."""
    check_number(gpu, where, lo=0)
    if gpu > 1 and float(gpu) != int(gpu):
        raise ConfigError(f"{where}: {gpu!r} is not allowed; use a fraction in (0, 1] to share a GPU "
                          f"(0.25 = four trials per GPU) or a whole number of GPUs")
    return float(gpu)


def parse_study(values: dict) -> StudyConfig:
    values = _mapping(values, "study", STUDY_KEYS)
    name = check_name(values.get("name"), "name")
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
    num_samples = check_number(search.get("num_samples", 1), "search.num_samples", lo=1, integer=True)
    seed = check_number(search.get("seed", 0), "search.seed", lo=0, integer=True)

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
    if metric not in OBJECTIVE_METRICS:
        raise ConfigError(f"objective.metric: {metric!r} is not reported{_suggest(metric, OBJECTIVE_METRICS)}; "
                          f"allowed: {', '.join(OBJECTIVE_METRICS)}")
    mode = objective.get("mode", "min" if metric == "train_loss" else "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"objective.mode: {mode!r} is not allowed; allowed: max, min")

    asha = values.get("asha")
    if asha is not None:
        asha = _mapping(asha, "asha", ASHA_KEYS)
        if len(StudyConfig(name, trial, group=group).group_members) > 1:
            raise ConfigError("asha: cannot stop trials early that evaluate a group (the objective is the mean "
                              "over all members); drop asha or the group")
        check_number(asha.get("grace_period", 1), "asha.grace_period", lo=1, integer=True)
        check_number(asha.get("reduction_factor", 2), "asha.reduction_factor", lo=1, integer=True, lo_open=True)

    resources = _mapping(values.get("resources"), "resources", RESOURCE_KEYS)
    cpu = float(check_number(resources.get("cpu", 1), "resources.cpu", lo=0, lo_open=True))
    gpu = check_gpu_request(resources.get("gpu", 0))
    max_concurrent = check_number(values.get("max_concurrent", 0) or 0, "max_concurrent", lo=0, integer=True)
    max_failures = check_number(values.get("max_failures", 2), "max_failures", lo=0, integer=True)
    reuse = values.get("reuse_actors", True)
    if not isinstance(reuse, bool):
        raise ConfigError(f"reuse_actors: must be true or false, got {reuse!r}")
    storage = values.get("storage") or "./results"
    if not isinstance(storage, str):
        raise ConfigError(f"storage: must be a folder or URI, got {storage!r}")

    pairs = check_pairs(values.get("pairs"), names)
    trial, variants, group, params = (_absolute_paths(trial), [_absolute_paths(v) for v in variants],
                                      _absolute_paths(group), _absolute_paths(params))
    study = StudyConfig(name=name, trial=dict(trial), kind=kind, params=dict(params),
                        num_samples=num_samples, search_seed=seed, variants=list(variants), group=dict(group),
                        metric=metric, mode=mode, asha=asha, cpu=cpu, gpu=gpu, max_concurrent=max_concurrent,
                        reuse_actors=reuse, max_failures=max_failures, storage=storage,
                        description=str(values.get("description") or ""), pairs=pairs)
    study.validate_trials()
    check_objective_defined(study)
    return study


def check_name(name, where: str = "name") -> str:
    """A study name is one folder inside the storage: no separator, no '..', nothing a shell or a URI
    would read differently."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name.strip()):
        raise ConfigError(f"{where}: must be one folder name of letters, digits and . _ + = - (starting with a "
                          f"letter or digit), got {name!r}")
    return name.strip()


def check_objective_defined(study: StudyConfig) -> None:
    """noise_auroc needs noisy samples and a selector's scores: a trial where no member has both would
    score NaN every time, and a search over NaN learns nothing."""
    if study.metric != "noise_auroc":
        return
    for overrides in study.corner_overrides():
        if not any(c.noise_rate > 0 and c.selector != "none" for _, c in study.trial_configs(overrides)):
            where = f"trial {overrides}" if overrides else "every trial"
            raise ConfigError(f"objective.metric: noise_auroc is undefined for {where} (no member has label noise "
                              f"and a selector); use val_acc, or set noise_rate > 0 and a selector")


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


# --- the stored study ---------------------------------------------------------------------------

def check_pairs(pairs, variants: list[str]) -> list[list[str]]:
    """`pairs: [[rsnl-m6, rsnl-m1], ...]`: each a variant and the reference it is compared with, seed by seed
    (the report's paired tables; every method minus CoOp is shown anyway)."""
    if pairs is None:
        return []
    if not isinstance(pairs, list):
        raise ConfigError("pairs: must be a list of [variant, reference] pairs of variant names")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConfigError(f"pairs[{i}]: must be [variant, reference], two variant names, got {pair!r}")
        unknown = [x for x in pair if x not in variants]
        if unknown:
            allowed = ", ".join(variants) if variants else "none (the study has no variants)"
            raise ConfigError(f"pairs[{i}]: {unknown[0]!r} is not a variant{_suggest(unknown[0], variants)}; "
                              f"allowed: {allowed}")
        if pair[0] == pair[1]:
            raise ConfigError(f"pairs[{i}]: compares {pair[0]!r} with itself")
    return [list(p) for p in pairs]


def study_to_dict(study: StudyConfig) -> dict:
    """The study as rsnl_study.yaml holds it, storage absolute (so a resume from elsewhere finds it)."""
    search = {"kind": study.kind, "num_samples": study.num_samples, "seed": study.search_seed,
              "params": study.params}
    return {"name": study.name, "description": study.description, "storage": study.storage_path(),
            "trial": study.trial, "search": search, "variants": study.variants, "group": study.group,
            "objective": {"metric": study.metric, "mode": study.mode}, "asha": study.asha,
            "resources": {"cpu": study.cpu, "gpu": study.gpu}, "max_concurrent": study.max_concurrent,
            "reuse_actors": study.reuse_actors, "max_failures": study.max_failures,
            **({"pairs": study.pairs} if study.pairs else {})}


def write_stored(study: StudyConfig) -> str:
    """Write rsnl_study.yaml into the experiment (a folder or a URI); returns its location."""
    where = storage.join(study.experiment_path(), STUDY_FILE)
    storage.write_bytes(where, yaml.safe_dump(study_to_dict(study), sort_keys=False).encode())
    return where


def missing_study(experiment: str) -> str:
    """A driver stopped before it wrote the study file ran nothing yet: say so, and how it starts."""
    return (f"no study to resume at {experiment} ({STUDY_FILE} missing): nothing of it has run yet if it was "
            f"stopped while starting, and the same command without --resume starts it; else check --storage "
            f"and --name")


def read_stored(experiment: str, check: bool = True) -> StudyConfig:
    """The study stored in an experiment (folder or URI), its storage set to where it was found now
    (the folder may have moved). check=False reads an older study without today's validation (the
    analysis of results that exist, whatever today's code would accept)."""
    where = storage.join(experiment, STUDY_FILE)
    if not storage.exists(where):
        raise ConfigError(missing_study(experiment))
    try:
        values = yaml.safe_load(storage.read_bytes(where))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot be read ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: is not a study (a mapping of study keys)")
    base, sep, query = experiment.rstrip("/").partition("?")
    values["storage"] = base.rsplit("/", 1)[0] + (f"?{query}" if sep else "")
    if check:
        return parse_study(values)
    search, objective = values.get("search") or {}, values.get("objective") or {}
    resources = values.get("resources") or {}
    metric = objective.get("metric", "val_acc")
    return StudyConfig(name=str(values.get("name")), trial=dict(values.get("trial") or {}),
                       kind=search.get("kind", "grid"), params=dict(search.get("params") or {}),
                       num_samples=int(search.get("num_samples", 1)), search_seed=int(search.get("seed", 0)),
                       variants=list(values.get("variants") or []), group=dict(values.get("group") or {}),
                       metric=metric, mode=objective.get("mode", "min" if metric == "train_loss" else "max"),
                       asha=values.get("asha"), cpu=float(resources.get("cpu", 1)),
                       gpu=float(resources.get("gpu", 0)), storage=values["storage"],
                       description=str(values.get("description") or ""), pairs=list(values.get("pairs") or []))


# --- trials on disk -----------------------------------------------------------------------------

def trial_folder_name(trial_id: str, config: dict, study: StudyConfig) -> str:
    """<trial id>[_<variant>]_<key>=<value>...: readable, one folder (any character that could leave it,
    nest it or confuse a shell becomes '_'), at most 120 characters."""
    parts = [trial_id]
    if isinstance(config.get("variant"), dict):
        parts.append(str(config["variant"].get("name")))
    for k in study.params:
        v = config.get(k)
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    name = _file_safe("_".join(parts), extra=",_")[:120]
    return name if name.strip(".") else trial_id


def manifest_name(member: str, members: int) -> str:
    """noise_manifest.csv for a single run; one file per group member otherwise, named by its settings."""
    return MANIFEST if members == 1 else f"noise_manifest_{_file_safe(member)}.csv"


def _file_safe(text: str, extra: str = "") -> str:
    """Runs of characters that could leave a folder, nest one or confuse a shell become one '_'."""
    return re.sub(f"[^A-Za-z0-9.=+{re.escape(extra)}-]+", "_", text)


def trial_record(trial_id: str, config: dict, members: list[tuple[str, TrialConfig]],
                 side_by_side: list[list[str]] | None = None, notes: list[str] | None = None) -> dict:
    """What rsnl_trial.json holds: the trial's params as Tune gave them, every member's full config, and
    which members trained side by side (rsnl/members.py) with the notes on why some did not."""
    record = {"trial_id": trial_id, "params": config, "members": {name: cfg.to_dict() for name, cfg in members}}
    if side_by_side is not None:
        record["side_by_side"] = {"groups": side_by_side, "notes": list(notes or [])}
    return record


def read_json(path) -> Any:
    """A JSON file rsnl or Tune wrote; a half-written or foreign one is one line naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: is not valid JSON (half-written or damaged: {e}); "
                         f"delete the file or the trial folder and resume") from None


def error_line(text: str) -> str:
    """The exception line of a trial's error.txt (Tune writes the traceback there); '' if none."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for x in reversed(lines):
        head = x.split(":", 1)[0]
        if head.replace(".", "").replace("_", "").isalnum() and head.endswith(("Error", "Exception", "Interrupt",
                                                                                "Exit")):
            return x
    return lines[-1] if lines else ""


# --- the Optuna record (optuna.db) --------------------------------------------------------------

def searched_keys(study: StudyConfig) -> list[str]:
    """The Optuna record's params: 'variant' (by name) for a study with variants, then the searched keys."""
    return (["variant"] if study.variants else []) + list(study.params)


def distributions(study: StudyConfig) -> dict:
    """Optuna distributions of the record's params (a grid axis is categorical over its values)."""
    import optuna.distributions as od
    out = {}
    if study.variants:
        out["variant"] = od.CategoricalDistribution([v["name"] for v in study.variants])
    for key, spec in study.params.items():
        (dist, v), = spec.items()
        if dist in ("choice", "grid"):
            out[key] = od.CategoricalDistribution(list(v))
        elif dist == "int":
            out[key] = od.IntDistribution(v[0], v[1])
        else:
            out[key] = od.FloatDistribution(v[0], v[1], log=dist == "loguniform")
    return out


def record_params(study: StudyConfig, config: dict) -> dict:
    """A trial's params as the Optuna record holds them (the variant by its name)."""
    out = {k: config[k] for k in study.params}
    if study.variants:
        out = {"variant": config["variant"]["name"], **out}
    return out


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
