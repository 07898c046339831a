"""Every field of every config dataclass a recipe can fill has a one-line docstring under it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

from forge.config import RecipeConfig


def sections(cls: type, seen: set[type]) -> None:
    seen.add(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp) and tp not in seen:
            sections(tp, seen)


def undocumented(cls: type) -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    missing = []
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            nxt = body[i + 1] if i + 1 < len(body) else None
            if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                missing.append(f"{cls.__module__}.{cls.__name__}.{node.target.id}")
    return missing


def test_every_recipe_field_has_a_docstring():
    classes: set[type] = set()
    sections(RecipeConfig, classes)
    assert len(classes) >= 10
    missing = [name for cls in sorted(classes, key=lambda c: c.__name__) for name in undocumented(cls)]
    assert not missing, f"fields without a docstring: {missing}"
    assert all(cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") for cls in classes)
