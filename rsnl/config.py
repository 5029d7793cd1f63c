"""The trial configuration: one validated dataclass; its defaults are the DTD protocol (docs/method.md).

Every problem is reported as one line naming the key and what is allowed, before anything costly
starts. Values from YAML or `--set key=value` go through the same checks. The allowed values of the
choice keys are defined here once; the modules that implement them dispatch on these names.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsnl.errors import ConfigError


# The choice keys' allowed values (the modules that implement them read these names too).
NOISE_TYPES = ("ptnl", "symmetric", "pairflip")       # rsnl/noise.py
SELECTORS = ("gmm", "ratio", "ot", "none")            # rsnl/similarity.py, rsnl/ot.py
LOSSES = ("ce", "gce", "mae", "ce+mae")               # rsnl/trainer.py
OT_COSTS = ("neg_log_prob", "neg_prob")               # rsnl/ot.py
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")    # rsnl/models.py
PRECISIONS = ("auto", "fp32", "bf16", "fp16")         # rsnl/device.py


def _choices(*allowed):
    return {"choices": allowed}


def _range(lo=None, hi=None, lo_open=False, hi_open=False):
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass
class TrialConfig:
    # data and noise
    dataset: str = field(default="dtd", metadata={"help": "dataset name (rsnl.data.list_datasets())"})
    data_root: str | None = field(default=None, metadata={"help": "folder that holds the dataset"})
    download: bool = field(default=False, metadata={"help": "download the dataset if missing (needs network)"})
    shots: int = field(default=16, metadata=_range(1))
    val_shots: int | None = field(default=None, metadata={**_range(1), "help": "val sample per class (None: shots)"})
    noise_type: str = field(default="ptnl", metadata=_choices(*NOISE_TYPES))
    noise_rate: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))
    seed: int = field(default=1, metadata=_range(0))
    noise_file: str | None = field(default=None, metadata={
        "help": "replay the train and val samples of a noise manifest (rsnl/manifest.py) instead of drawing them"})
    # model
    backbone: str = field(default="RN50", metadata={"help": "open_clip model name or rsnl-tiny"})
    pretrained: str | None = field(default="openai", metadata={"help": "tag, checkpoint path, or none"})
    blocks: int = field(default=6, metadata=_range(1, 64))
    n_ctx: int = field(default=16, metadata=_range(1, 64))
    ctx_init: str | None = None
    csc: bool = False
    class_token_position: str = field(default="end", metadata=_choices(*CLASS_TOKEN_POSITIONS))
    # optimisation
    epochs: int = field(default=50, metadata=_range(1))
    batch_size: int = field(default=32, metadata=_range(1))
    lr: float = field(default=0.002, metadata=_range(0.0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0, hi_open=True))
    weight_decay: float = field(default=5e-4, metadata=_range(0.0))
    warmup_epochs: int = field(default=1, metadata=_range(0))
    warmup_lr: float = field(default=1e-5, metadata=_range(0.0, lo_open=True))
    warmup_recount: bool = field(default=False, metadata={
        "help": "restart the cosine count after warm-up, as Dassl (CoOp's and the original code's trainer) does"})
    loss: str = field(default="ce", metadata={**_choices(*LOSSES),
                                              "help": "ce+mae: cross-entropy on kept samples, MAE on the rest"})
    gce_q: float = field(default=0.5, metadata={**_range(0.0, 1.0, lo_open=True),
                                                "help": "GCE's q (0.5, as PTNL's trainer)"})
    drop_last: bool = field(default=False, metadata={
        "help": "drop each epoch's last incomplete batch of kept samples (the original code does)"})
    # robust similarity and selection
    alpha_base: float = field(default=0.2, metadata=_range(0.0, 1.0))
    alpha_rate: float = field(default=35.0, metadata=_range(0.0, lo_open=True))
    alpha_lag: int = field(default=0, metadata={**_range(0, 1), "help": "1: epoch e uses alpha(max(e - 1, 0)), "
                                                                        "as the original code does"})
    selector: str = field(default="gmm", metadata={**_choices(*SELECTORS),
                                                   "help": "ot: NLPrompt's PromptOT (rsnl/ot.py)"})
    select_ratio: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))
    gmm_threshold: float = field(default=0.5, metadata=_range(0.0, 1.0))
    gmm_reg_covar: float = field(default=5e-4, metadata=_range(0.0, lo_open=True))
    gmm_max_iter: int = field(default=100, metadata={**_range(1), "help": "EM iterations (the original code: 10)"})
    gmm_tol: float = field(default=1e-3, metadata={**_range(0.0, lo_open=True),
                                                   "help": "EM convergence tolerance (the original code: 1e-2)"})
    ot_eps: float = field(default=0.01, metadata={**_range(0.0, lo_open=True), "help": "entropic OT's epsilon"})
    ot_cost: str = field(default="neg_log_prob", metadata={**_choices(*OT_COSTS),
                                                           "help": "OT cost: -log p (the paper) or -p (its code)"})
    # features and runtime
    aug_views: int = field(default=10, metadata={**_range(0), "help": "precomputed augmented views per image"})
    aug_scale: float = field(default=0.08, metadata={**_range(0.0, 1.0, lo_open=True),
                                                     "help": "smallest crop area of the random resized crop"})
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    cache_dir: str | None = field(default=None, metadata={"help": "feature cache (None: $RSNL_CACHE or ~/.cache/rsnl)"})
    feature_batch_size: int = field(default=64, metadata=_range(1))
    num_workers: int = field(default=0, metadata=_range(0))
    batch_members: bool = field(default=True, metadata={
        "help": "a study trial trains its group members side by side, one text-tower pass per step for all "
                "(rsnl/members.py); false: one member at a time"})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check(f, getattr(self, f.name)))
        if isinstance(self.pretrained, str) and self.pretrained.lower() in ("none", "null", ""):
            self.pretrained = None
        if self.noise_file is not None and not self.noise_file.strip():
            raise ConfigError("noise_file: must be the path of a noise manifest (CSV), or null")
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ConfigError("ctx_init: must be a non-empty text such as 'a photo of a', or null")
        if self.ctx_init is not None and self.blocks > 1:
            raise ConfigError("ctx_init: with blocks > 1 every block would start from the same text and stay "
                              "identical; use random init (ctx_init: null) for several blocks")
        if self.device not in ("auto", "cpu", "cuda") and not _is_cuda_index(self.device):
            raise ConfigError(f"device: {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")
        if not self.backbone.strip():
            raise ConfigError("backbone: must be an open_clip model name or rsnl-tiny")
        from rsnl.data import DATASETS
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: {self.dataset!r} is not known{_suggest(self.dataset, DATASETS)}; "
                              f"allowed: {', '.join(sorted(DATASETS))}")

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"trial config must be a mapping of keys to values, got {type(values).__name__}")
        unknown = [k for k in values if k not in cls.keys()]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"{k}: unknown key{_suggest(k, cls.keys())}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, *paths: str | os.PathLike, overrides: list[str] | None = None) -> "TrialConfig":
        """Layered YAML files (later ones win, e.g. a dataset file then a method file), then `key=value`
        overrides."""
        values = {}
        for path in paths:
            values.update(load_yaml(path))
        values.update(parse_overrides(overrides or []))
        return cls.from_dict(values)

    def replace(self, **changes) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 5e-4 (no dot) as a string; researchers write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return values


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings; values are read as YAML scalars (0.5 -> float, true -> bool, null -> None)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_cuda_index(device: str) -> bool:
    head, _, idx = device.partition(":")
    return head == "cuda" and idx.isdigit()


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _has_type(value, base: type) -> bool:
    """bool is an int in Python, but true is not a number of epochs; an int is a fine float."""
    if base is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if base is float:
        return isinstance(value, (int, float))
    return isinstance(value, base)


def _check(f: dataclasses.Field, value):
    """Type and range check of one field; returns the value coerced where lossless (int -> float)."""
    tp = f.type if isinstance(f.type, str) else f.type.__name__
    optional = "None" in tp
    base = {"int": int, "float": float, "bool": bool, "str": str}[tp.split("|")[0].strip()]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{f.name}: must be {_type_name(base)}, got null")
    if not _has_type(value, base):
        raise ConfigError(f"{f.name}: must be {_type_name(base)}, got {value!r}")
    if base is float:
        value = float(value)
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{f.name}: {value!r} is not allowed{_suggest(value, meta['choices'])}; "
                          f"allowed: {', '.join(meta['choices'])}")
    if "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        if not _in_range(value, lo, hi, lo_open, hi_open):
            raise ConfigError(f"{f.name}: {value!r} is out of range; allowed: {_interval(lo, hi, lo_open, hi_open)}")
    return value


def _in_range(value, lo, hi, lo_open, hi_open) -> bool:
    if value != value:  # NaN
        return False
    above_lo = lo is None or value > lo or (value == lo and not lo_open)
    below_hi = hi is None or value < hi or (value == hi and not hi_open)
    return above_lo and below_hi


def _interval(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
