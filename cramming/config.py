"""The boundary between Hydra/OmegaConf and the rest of the project.

Configs arrive as `DictConfig`s composed by Hydra; everything past this module works with plain,
typed dataclasses. `to_dataclass` does that conversion strictly: an unknown key fails with the list
of valid ones, so a typo in an override never silently does nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from cramming.checks import validate
from cramming.errors import ConfigError


def _config_dir() -> Path:
    """Where the Hydra configs are: inside the package when it is installed from a wheel (which
    carries them as cramming/configs), else the checkout's top-level configs/ (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(f"no configs found (looked for config.yaml in {here / 'configs'} and {here.parent / 'configs'}); "
                      "reinstall the package (`pip install .`)")


CONFIG_DIR = _config_dir()

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Strict conversion of config nodes into dataclasses
# ---------------------------------------------------------------------------------------------


def to_container(node: Any) -> Any:
    """Resolve interpolations and turn OmegaConf nodes into plain Python containers."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _bad_type(tp: Any, value: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}={value!r} has the wrong type: expected {_describe(tp)}, got {type(value).__name__}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the field type `tp` (coercing int to float, a whole float to int and a
    number to str), so a wrongly typed override fails here with a ConfigError naming the key rather
    than later as a TypeError or AttributeError deep inside a stage."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return to_dataclass(tp, value, where)
        if isinstance(value, tp):
            return value
        raise _bad_type(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                return to_dataclass(arm, value, where)
        first: ConfigError | None = None
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _convert(arm, value, where)
            except ConfigError as err:
                first = first or err
        raise _bad_type(tp, value, where) if first is None or len(arms) > 2 else first
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ConfigError(f"{where}={value!r} must be {_describe(tp)}")
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _bad_type(tp, value, where)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1:
            if len(value) != len(args):
                raise ConfigError(f"{where}={value!r} must have {len(args)} items")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _bad_type(tp, value, where)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad_type(tp, value, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # e.g. 1e6 written for a count
            return int(value)
        raise _bad_type(tp, value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad_type(tp, value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # data.name=2024 parses as int
            return str(value)
        raise _bad_type(tp, value, where)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _bad_type(tp, value, where)
    return value


# Keys that moved to another home, by their old dotted name: an override or a config that still
# sets one is told where the value lives now (resume translates saved ones, cramming.train.trainer).
MOVED_KEYS = {
    "train.budget_kind": "the budget is the top-level `budget` now: budget=<N>steps, budget=<N>tokens or a "
                         "duration such as budget=24h",
    "train.budget_steps": "use budget=<N>steps (e.g. budget=300steps)",
    "train.budget_tokens": "use budget=<N>tokens (e.g. budget=400ktokens)",
    "gpu.target_batch_size": "use train.target_batch_size=<N> (rounded down to whole micro-batches per step)",
    "train.decay_norms_biases_embeddings": "it is two keys now: train.decay_embeddings (true in the recipes) and "
                                           "train.decay_norms_biases (false)",
    "train.seed": "the seed is the top-level `seed` only: seed=<N>",
    "train.tensorboard": "use train.report_to=[tensorboard] (the trackers: tensorboard, wandb, mlflow)",
}


def to_dataclass(cls: type[T], node: Any, where: str = "") -> T:
    """Build `cls` from a config node, rejecting keys that `cls` does not define.

    `where` names the config group in messages (e.g. "arch"), so the user sees which override
    to fix. Nested dataclass fields are converted recursively; validation of values is the job of
    each dataclass's `__post_init__`.
    """
    values = to_container(node)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config '{where or cls.__name__}' must be a mapping, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        moved = "".join(f"{prefix}{k} moved: {MOVED_KEYS[prefix + k]}; " for k in unknown if prefix + k in MOVED_KEYS)
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"{moved}valid keys are: {', '.join(names)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints.get(k, Any), v, f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a missing required field
        raise ConfigError(f"invalid config for {where or cls.__name__}: {err}") from None


def config_hash(obj: Any, length: int = 12) -> str:
    """A short, stable hash of a (resolved) config, used to key caches and outputs."""
    import hashlib
    import json

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    text = json.dumps(to_container(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------

BudgetKind = Literal["time", "tokens", "steps"]
"""What a budget counts: wall-clock seconds, tokens (sequences x seq_len over all ranks) or optimizer steps."""

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(rf"^\s*{_NUMBER}\s*([smhd]?)\s*$", re.IGNORECASE)
# Counts are large, so they also take an exponent (1e9tokens) and a k/M/G multiplier (2.5Mtokens).
_COUNT_RE = re.compile(rf"^\s*{_NUMBER}(e[+-]?\d{{1,3}})?\s*([kmg]?)\s*(tokens?|steps?)\s*$", re.IGNORECASE)
_MULTIPLIER_EXPONENTS = {"": 0, "k": 3, "m": 6, "g": 9}
_SUFFIXES = {"time": "s", "tokens": "tokens", "steps": "steps"}
BUDGET_FORMS = ("a duration: a number with a unit s, m, h or d (e.g. 24h, 90m, 45s, 1.5h, 1d) or a bare number of "
                "hours (e.g. 24); or optimizer steps: <N>steps (e.g. 300steps); or tokens: <N>tokens, optionally "
                "with k, M or G (e.g. 400ktokens, 2.5Mtokens, 1e9tokens)")


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
    """A parsed top-level `budget`: what it counts and how much of it."""

    kind: BudgetKind
    """time, tokens or steps."""
    amount: float
    """Seconds, tokens or optimizer steps (a whole number for tokens and steps)."""

    def __post_init__(self) -> None:
        validate(self, "budget", [(math.isfinite(self.amount) and self.amount > 0,
                                   f"amount must be a positive number, got {self.amount}")])

    def __str__(self) -> str:
        """The `budget` value that parses back to this spec, e.g. 5400s, 300steps, 400000tokens."""
        return f"{self.amount:.15g}{_SUFFIXES[self.kind]}"


def parse_budget(value: str | int | float) -> BudgetSpec:
    """Parse the top-level `budget`: a wall-clock duration, or a number of optimizer steps or tokens.

    A bare number means hours, as budgets are quoted in the Cramming paper ("24 hours"). Units are
    case-insensitive, so 10M is ten minutes and 2.5mtokens 2.5 million tokens.
    """
    if isinstance(value, bool):
        raise ConfigError(f"budget={value!r} is not a budget; use {BUDGET_FORMS}")
    if isinstance(value, (int, float)):
        kind, amount = "time", float(value) * 3600.0
    elif duration := _DURATION_RE.match(str(value)):
        number, unit = duration.groups()
        kind, amount = "time", float(number) * _UNITS[(unit or "h").lower()]
    elif count := _COUNT_RE.match(str(value)):
        number, exponent, multiplier, unit = count.groups()
        kind = "tokens" if unit.lower().startswith("token") else "steps"
        exact = decimal.Decimal(number + (exponent or "")).scaleb(_MULTIPLIER_EXPONENTS[multiplier.lower()])
        if exact != exact.to_integral_value():
            raise ConfigError(f"budget={value!r} is not a whole number of {kind}; use {BUDGET_FORMS}")
        amount = float(exact)
    else:
        raise ConfigError(f"budget={value!r} is not a budget; use {BUDGET_FORMS}")
    try:
        return BudgetSpec(kind, amount)  # the spec checks its amount; here the message adds the forms
    except ConfigError:
        raise ConfigError(f"budget={value!r} must be positive and finite; use {BUDGET_FORMS}") from None


def format_duration(seconds: float) -> str:
    """Human-readable duration, e.g. 86400 -> '24h00m00s'."""
    seconds = max(0.0, float(seconds))
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# Configured paths
# ---------------------------------------------------------------------------------------------

# The keys that hold a user-given path, in whichever stages read them. Paths inside the data
# config (data.*) are left as written: they are part of the cache key of the prepared data.
PATH_KEYS = ("paths.data_root", "paths.out_root", "resume", "ckpt", "glue.data_dir", "glue.tokenizer")

# `${cram.path:...}` in the `hydra.run.dir` / `hydra.sweep.dir` of configs/config.yaml: Hydra
# creates the output folder before any stage runs, so a `~` there is expanded by the config itself.
OmegaConf.register_new_resolver("cram.path", lambda path: os.path.expanduser(str(path)), replace=True)


def resolve_paths(cfg: DictConfig) -> DictConfig:
    """A copy of the composed `cfg` with `~` expanded in every configured path (PATH_KEYS).

    Every stage entry point calls this first, so `paths.data_root='~/dc'` names the same folder
    for `cram data`, `cram pretrain` and `cram glue`. Relative paths stay relative to the working
    directory (Hydra's job.chdir is off); missing keys, nulls and non-paths such as
    `ckpt=random-init` are left alone.
    """
    resolved = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(resolved, key, os.path.expanduser(value), merge=False)
    return resolved
