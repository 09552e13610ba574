"""Argument checks shared by the constructors: typed errors naming the allowed range."""

from __future__ import annotations

import math
from typing import get_args

from ._types import Selection

__all__ = ["check_balancer_arguments", "check_positive"]

_SELECTIONS = frozenset(get_args(Selection))


def check_balancer_arguments(
    source: object, backend: object, selection: object, failures_to_cool: object, seed: object
) -> None:
    if not callable(getattr(source, "fetch", None)):
        raise TypeError("source must have an async fetch() method")
    if backend is not None and not all(
        hasattr(backend, name) for name in ("immediate", "try_acquire", "release", "set_map")
    ):
        raise TypeError(
            f"backend must be a Backend such as MemoryBackend() or RedisBackend(url), "
            f"not {type(backend).__name__}"
        )
    if selection not in _SELECTIONS:
        raise ValueError(f"selection must be one of {sorted(_SELECTIONS)}")
    if isinstance(failures_to_cool, bool) or not isinstance(failures_to_cool, int):
        raise TypeError("failures_to_cool must be an int")
    if failures_to_cool < 1:
        raise ValueError("failures_to_cool must be at least 1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError("seed must be an int or None")


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, not {value!r}")
