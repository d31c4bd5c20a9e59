"""Choices live in the `Literal` types only: every Literal field of a config dataclass rejects a value
outside its choices with a ConfigError naming the key, built in Python or converted from a config
dict, and no module keeps a hand-written tuple of the same choices beside the type.

The fields are found by introspection, so a new Literal field is covered without touching this file.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cramming.checks import literal_choices
from cramming.config import to_dataclass
from cramming.data.prepare import DataConfig
from cramming.data.sources import HubSource
from cramming.errors import ConfigError
from cramming.glue import CustomTaskConfig, GlueConfig
from cramming.model.bert import ModelConfig

PACKAGE = Path(__file__).resolve().parents[1] / "cramming"
BAD = "not-a-choice"
_CUSTOM = {"name": "c", "train_file": "a.tsv", "dev_file": "b.tsv", "text_columns": ["s"], "label_column": "y"}


@dataclasses.dataclass(frozen=True)
class Case:
    cls: type
    base: dict[str, Any]
    """Keyword arguments of a valid instance."""
    group: str
    """The config group its messages start with."""
    as_config: Callable[[dict[str, Any]], tuple[type, dict[str, Any]]]
    """How the dataclass arrives from a composed config: the top-level class and its dict."""


CASES = [
    Case(ModelConfig, {}, "arch", lambda d: (ModelConfig, d)),
    Case(DataConfig, {}, "data", lambda d: (DataConfig, d)),
    Case(HubSource, {}, "data", lambda d: (DataConfig, {"source": "hub", "hub_sources": [d]})),
    Case(CustomTaskConfig, _CUSTOM, "glue", lambda d: (GlueConfig, {"custom_tasks": [d]})),
    Case(GlueConfig, {}, "glue", lambda d: (GlueConfig, d)),
]


def _literal_fields() -> list[tuple[Case, str, tuple[Any, ...]]]:
    found = []
    for case in CASES:
        hints = typing.get_type_hints(case.cls)
        for f in dataclasses.fields(case.cls):
            if choices := literal_choices(hints[f.name]):
                found.append((case, f.name, choices))
    return found


FIELDS = _literal_fields()
IDS = [f"{case.cls.__name__}.{name}" for case, name, _ in FIELDS]


def test_the_fields_that_had_hand_kept_choices_are_literal_typed() -> None:
    names = {(case.cls.__name__, name) for case, name, _ in FIELDS}
    assert {("ModelConfig", "attention_backend"), ("ModelConfig", "norm"), ("DataConfig", "tokenizer"),
            ("DataConfig", "sorting"), ("CustomTaskConfig", "kind"), ("CustomTaskConfig", "format"),
            ("GlueConfig", "schedule"), ("GlueConfig", "on_bad_row")} <= names


def _names_key(group: str, name: str) -> str:
    # e.g. "arch.norm='x'" or "glue.custom_tasks[c].kind='x'" (validate) / "glue.custom_tasks[0].kind='x'"
    # (to_dataclass): the group, the path to the field, the key and the rejected value.
    return rf"^{re.escape(group)}(\.\S+)?\.{name}={re.escape(repr(BAD))} must be one of"


@pytest.mark.parametrize(("case", "name", "choices"), FIELDS, ids=IDS)
def test_literal_field_rejects_a_value_outside_its_choices(case: Case, name: str, choices: tuple) -> None:
    assert BAD not in choices
    with pytest.raises(ConfigError, match=_names_key(case.group, name)) as err:
        case.cls(**{**case.base, name: BAD})
    assert all(str(c) in str(err.value) for c in choices), "the message lists the valid choices"


@pytest.mark.parametrize(("case", "name", "choices"), FIELDS, ids=IDS)
def test_literal_field_rejects_through_to_dataclass(case: Case, name: str, choices: tuple) -> None:
    top, values = case.as_config({**case.base, name: BAD})
    group = {ModelConfig: "arch", DataConfig: "data", GlueConfig: "glue"}[top]
    with pytest.raises(ConfigError, match=_names_key(group, name)):
        to_dataclass(top, values, group)


OPTIONAL = [(case, name) for case, name, _ in FIELDS
            if type(None) in typing.get_args(typing.get_type_hints(case.cls)[name])]


@pytest.mark.parametrize(("case", "name"), OPTIONAL, ids=[f"{c.cls.__name__}.{n}" for c, n in OPTIONAL])
def test_optional_literal_field_takes_null_and_says_so(case: Case, name: str) -> None:
    assert getattr(case.cls(**{**case.base, name: None}), name) is None
    with pytest.raises(ConfigError, match=r"must be one of: .* or null$"):
        case.cls(**{**case.base, name: BAD})


# ---------------------------------------------------------------------------------------------
# No hand-kept copies of a Literal's choices
# ---------------------------------------------------------------------------------------------


def _strings(node: ast.AST) -> frozenset[str] | None:
    """The strings of a tuple/list/set display of two or more string constants, else None."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return frozenset(e.value for e in node.elts)
    return None


def _literal_sets(tree: ast.AST) -> set[frozenset[str]]:
    sets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and "Literal" in (getattr(node.value, "id", None),
                                                             getattr(node.value, "attr", None)):
            if (choices := _strings(node.slice)) is not None:
                sets.add(choices)
    return sets


def _copies_of_literals(trees: dict[str, ast.Module]) -> list[str]:
    """Module-level assignments whose value is a display of the same strings as some Literal of the
    package. Only module level: inside functions, short tuples such as ("cpu", "cuda") coincide with a
    Literal's choices without repeating them."""
    literals = set().union(*(_literal_sets(t) for t in trees.values()))
    return [f"{name}:{node.lineno}" for name, tree in trees.items() for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
            and _strings(node.value) in literals]


def test_the_scan_finds_a_copied_tuple() -> None:
    trees = {"a.py": ast.parse('Kind = Literal["x", "y"]\nOTHER = ("x", "z")\n'),
             "b.py": ast.parse('KINDS: tuple[str, ...] = ("y", "x")\n')}
    assert _copies_of_literals(trees) == ["b.py:1"]


def test_no_module_keeps_a_tuple_of_a_literals_choices() -> None:
    trees = {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}
    assert _copies_of_literals(trees) == [], "take the choices from the Literal with typing.get_args"
