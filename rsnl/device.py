"""Where a trial computes, and in which precision: CUDA gets bf16 autocast (fp32 master weights),
the CPU stays fp32."""

from __future__ import annotations

import torch

from rsnl.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} was asked for but no CUDA GPU is visible; use device: cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype, or None for plain fp32 ('auto' means bf16 on CUDA)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def precision_name(precision: str, device: torch.device) -> str:
    """What `precision` resolves to on `device`: fp32, bf16 or fp16 (part of the feature cache key)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(precision, device)]
