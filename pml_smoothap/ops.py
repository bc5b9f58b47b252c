"""Functional API: smooth AP and exact AP of a (Q, N) score matrix under boolean masks.

Usable without pytorch-metric-learning. ``scores[q, j]`` is how close item ``j`` is to query
``q`` (larger is closer). ``pos_mask[q, j]`` marks the positives of ``q``; ``valid_mask[q, j]``
the items ranked for ``q`` (default: all). Every positive must be ranked (``pos_mask`` ⊆
``valid_mask``). A query with no positive has no AP: its entry is NaN (select queries with
``pos_mask.any(1)``).
"""
import functools
import math
import numbers
import os
import re
from typing import Optional

import torch

from .kernels import torch_chunked

BACKENDS = ("auto", "torch", "triton")
MIN_TRITON = (3, 2)  # the oldest Triton the kernels are tested with


def check_temperature(temperature) -> float:
    """``temperature`` as a float, or ValueError unless it is a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_workspace(workspace_bytes: Optional[int]) -> Optional[int]:
    """None (the device's default) or a whole number of bytes >= 1."""
    if workspace_bytes is None:
        return None
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, numbers.Integral):
        raise TypeError(f"workspace_bytes must be an integer or None, got {workspace_bytes!r}")
    if workspace_bytes < 1:
        raise ValueError(f"workspace_bytes must be >= 1, got {workspace_bytes}")
    return int(workspace_bytes)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(
    backend: str, device: torch.device, dtype: Optional[torch.dtype] = None
) -> str:
    """The backend that runs scores of ``dtype`` on ``device``: "torch" or "triton".

    "auto" is "triton" for CUDA tensors when Triton >= 3.2 imports, "torch" otherwise. An
    explicit "triton" needs Triton >= 3.2 and a CUDA tensor, or a CPU tensor with
    TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests). float64 scores always use "torch": the Triton
    kernels accumulate in float32.
    """
    backend = check_backend(backend)
    device = torch.device(device)
    if backend == "torch" or dtype == torch.float64:
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if not _triton_available():
        found = _triton_version()
        raise ImportError(
            f"backend='triton' needs Triton >= {'.'.join(map(str, MIN_TRITON))}, found "
            f"{'none' if found is None else '.'.join(map(str, found))}: pip install -U triton "
            "(Linux x86_64), or use backend='torch'"
        )
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not (device.type == "cpu" and interpret):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, got a {device.type} tensor; on CPU set "
            "TRITON_INTERPRET=1 (Triton's interpreter, slow) or use backend='torch'"
        )
    return "triton"


@functools.lru_cache(maxsize=None)  # asked on every call of the loss; a failed import is slow
def _triton_version() -> Optional[tuple]:
    """(major, minor) of the installed Triton, or None when it does not import."""
    try:
        import triton
    except ImportError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])


def _triton_available() -> bool:
    version = _triton_version()
    return version is not None and version >= MIN_TRITON


def _check_inputs(scores, pos_mask, valid_mask):
    if not torch.is_tensor(scores) or scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError("scores must be a floating-point tensor of shape (Q, N)")
    masks = {"pos_mask": pos_mask, "valid_mask": valid_mask}
    for name, mask in masks.items():
        if mask is None and name == "valid_mask":
            continue
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor")
        if mask.shape != scores.shape:
            raise ValueError(
                f"{name} has shape {tuple(mask.shape)}, scores have shape {tuple(scores.shape)}"
            )
    pos_mask = pos_mask.to(scores.device)
    if valid_mask is not None:
        valid_mask = valid_mask.to(scores.device)
        if (pos_mask & ~valid_mask).any():
            raise ValueError("every positive must be ranked: pos_mask must imply valid_mask")
    return pos_mask, valid_mask


def smooth_ap(
    scores: torch.Tensor,
    pos_mask: torch.Tensor,
    valid_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.01,
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
) -> torch.Tensor:
    """Smooth AP of each query, (Q,), differentiable with respect to ``scores``.

    For each positive ``i`` of query ``q``, with σ the logistic sigmoid and τ the temperature::

        A[q, i] = 1 + Σ_{j valid, j≠i} σ((s[q, j] - s[q, i]) / τ)
        R[q, i] = 1 + Σ_{j positive, j≠i} σ((s[q, j] - s[q, i]) / τ)
        AP[q]   = mean over positives i of R[q, i] / A[q, i]

    Ranks are computed in float32 (float64 for float64 scores); the result has the scores'
    dtype. NaN for a query without positives. ``backend``: "torch", "triton" (fused kernels) or
    "auto" (see :func:`resolve_backend`). ``workspace_bytes`` bounds the temporaries of the
    "torch" backend (default: 4 MiB on CPU, where blocks then stay in cache; 64 MiB elsewhere).
    """
    temperature = check_temperature(temperature)
    workspace_bytes = check_workspace(workspace_bytes)
    pos_mask, valid_mask = _check_inputs(scores, pos_mask, valid_mask)
    if resolve_backend(backend, scores.device, scores.dtype) == "triton":
        from .kernels import triton_fused  # imported on first use: Triton stays optional

        return triton_fused.smooth_ap(scores, pos_mask, valid_mask, temperature)
    return torch_chunked.smooth_ap(scores, pos_mask, valid_mask, temperature, workspace_bytes)


def average_precision(
    scores: torch.Tensor,
    pos_mask: torch.Tensor,
    valid_mask: Optional[torch.Tensor] = None,
    workspace_bytes: Optional[int] = None,
) -> torch.Tensor:
    """Exact AP of each query, (Q,): the τ → 0 limit of :func:`smooth_ap` (not differentiable).

    The sigmoid becomes a step that counts a tie as 1/2. Without ties this is the usual AP, the
    mean over positives of the precision at their rank. NaN for a query without positives.
    """
    pos_mask, valid_mask = _check_inputs(scores, pos_mask, valid_mask)
    workspace_bytes = check_workspace(workspace_bytes)
    return torch_chunked.average_precision(scores.detach(), pos_mask, valid_mask, workspace_bytes)
