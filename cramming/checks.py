"""The one check every config dataclass runs in `__post_init__` (docs/design.md, "Config").

Torch-free and Hydra-free, so the model and the data formats can check their configs without
pulling in OmegaConf; `cramming.config.to_dataclass` converts nodes, this module checks values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from cramming.errors import ConfigError


def literal_choices(tp: Any) -> tuple[Any, ...]:
    """The choices of a `Literal` type, also inside `Optional[...]`/`X | None`; () for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(c for arm in typing.get_args(tp) for c in literal_choices(arm))
    return ()


def validate(obj: Any, where: str, rules: Iterable[tuple[bool, str]] = ()) -> None:
    """The one check every config dataclass runs in `__post_init__`, so a config built in Python is
    checked like one composed by Hydra: each `Literal`-typed field must be one of the type's choices
    (the choices live in the type only), then each `(ok, message)` rule must hold. Messages are
    prefixed with `where.` (the config group), e.g. "train.lr must be > 0, got -1"."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = literal_choices(hints.get(f.name))
        value = getattr(obj, f.name)
        optional = _optional(hints.get(f.name))
        if choices and value not in choices and not (value is None and optional):
            or_null = " or null" if optional else ""
            raise ConfigError(f"{where}.{f.name}={value!r} must be one of: {', '.join(map(str, choices))}{or_null}")
    for ok, message in rules:
        if not ok:
            raise ConfigError(f"{where}.{message}")


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
