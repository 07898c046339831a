"""Tools: the `@tool` decorator, JSON schemas from type hints, and argument checking.

A tool is a method of a `ToolEnv` marked with `@tool`. Its JSON schema (the OpenAI
function-calling shape: name, description, parameters) comes from the signature's type hints
and the docstring: the first paragraph is the description, and a Google-style `Args:` section
describes the parameters. Arguments the policy sends are checked against the signature before
the tool runs, so a wrong type or a missing argument becomes an error message the policy can
read, never an exception inside the tool.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

_TOOL_ATTR = "__forge_tool__"


@dataclass(frozen=True)
class ToolSpec:
    """What the env knows of one tool: its name, schema, signature and time limit."""

    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments object."""
    method: str
    """Name of the env method that implements the tool (may differ from `name`)."""
    hints: dict[str, Any] = field(repr=False)
    """Resolved type hints of the parameters, used to check arguments."""
    required: tuple[str, ...] = ()
    timeout_s: float | None = None
    """Wall-clock limit of one call; None uses the env's `tool_timeout_s`."""

    def schema(self) -> dict[str, Any]:
        """The schema shown to the policy in the task prompt."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def tool(fn: Callable | None = None, *, name: str | None = None, timeout_s: float | None = None):
    """Mark an env method as a tool; use bare (`@tool`) or with options (`@tool(timeout_s=2)`)."""

    def mark(f: Callable) -> Callable:
        setattr(f, _TOOL_ATTR, {"name": name or f.__name__, "timeout_s": timeout_s})
        return f

    return mark(fn) if fn is not None else mark


def collect_tools(cls: type) -> dict[str, ToolSpec]:
    """All `@tool` methods of an env class (base classes included), by tool name."""
    specs: dict[str, ToolSpec] = {}
    for attr in dir(cls):
        fn = getattr(cls, attr, None)
        opts = getattr(fn, _TOOL_ATTR, None)
        if opts is None:
            continue
        spec = build_spec(fn, opts["name"], opts["timeout_s"], method=attr)
        specs[spec.name] = spec
    return specs


def build_spec(fn: Callable, name: str, timeout_s: float | None, method: str | None = None) -> ToolSpec:
    """The `ToolSpec` of one tool method; raises TypeError naming what to fix."""
    qual = getattr(fn, "__qualname__", name)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise TypeError(f"tool {qual}: cannot resolve its type hints ({exc}); import the types it names") from exc
    doc = inspect.getdoc(fn) or ""
    description, arg_docs = _parse_docstring(doc)
    if not description:
        raise TypeError(f"tool {qual} has no docstring; write one line saying what it does, the policy reads it")
    properties: dict[str, Any] = {}
    required: list[str] = []
    arg_hints: dict[str, Any] = {}
    params = list(inspect.signature(fn).parameters.values())[1:]  # drop self
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool {qual} takes *{p.name}; give every argument a name and a type")
        if p.name not in hints:
            raise TypeError(f"tool {qual}: argument '{p.name}' has no type hint; add one (str, int, float, bool, list[...])")
        arg_hints[p.name] = hints[p.name]
        prop = json_schema(hints[p.name], where=f"tool {qual} argument '{p.name}'")
        if p.name in arg_docs:
            prop["description"] = arg_docs[p.name]
        properties[p.name] = prop
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": properties, "required": list(required)}
    return ToolSpec(name, description, parameters, method or fn.__name__, arg_hints, tuple(required), timeout_s)


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph, {arg: description}) from a Google-style docstring."""
    paragraphs = doc.strip().split("\n\n")
    description = " ".join(paragraphs[0].split()) if paragraphs and paragraphs[0].strip() else ""
    arg_docs: dict[str, str] = {}
    match = re.search(r"^Args:\s*\n((?:[ \t]+.*\n?)+)", doc, re.MULTILINE)
    if match:
        for line in match.group(1).splitlines():
            m = re.match(r"\s+(\w+)(?:\s*\(.*?\))?:\s*(.+)", line)
            if m:
                arg_docs[m.group(1)] = m.group(2).strip()
    return description, arg_docs


_PRIMITIVES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def json_schema(hint: Any, where: str = "type") -> dict[str, Any]:
    """JSON schema of a type hint: str, int, float, bool, list[T], dict[str, T], Optional, Literal."""
    if hint in _PRIMITIVES:
        return {"type": _PRIMITIVES[hint]}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is list or hint is list:
        return {"type": "array", "items": json_schema(args[0], where)} if args else {"type": "array"}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return {"anyOf": [json_schema(non_none[0], where), {"type": "null"}]}
    raise TypeError(f"{where} has type {hint!r}, which has no JSON schema; use str, int, float, bool, list, dict, Optional or Literal")


def check_value(value: Any, hint: Any) -> str | None:
    """None when `value` (decoded JSON) fits `hint`, else what is wrong, e.g. 'int; it takes str'."""
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (str, bool):
        ok = isinstance(value, hint)
    else:
        return _check_generic(value, hint)
    return None if ok else f"{_json_type(value)}; it takes {_PRIMITIVES[hint]}"


def _check_generic(value: Any, hint: Any) -> str | None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is list or hint is list:
        if not isinstance(value, list):
            return f"{_json_type(value)}; it takes an array"
        for i, item in enumerate(value):
            problem = check_value(item, args[0]) if args else None
            if problem:
                return f"an array whose item {i} is {problem}"
        return None
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else f"{_json_type(value)}; it takes an object"
    if origin is Literal:
        return None if value in args else f"{value!r}; it takes one of {list(args)}"
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        problems = [check_value(value, a) for a in non_none]
        return None if any(p is None for p in problems) else problems[0]
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def check_arguments(spec: ToolSpec, arguments: Any) -> str | None:
    """None when `arguments` can be passed to the tool, else an error message naming the fix."""
    if not isinstance(arguments, dict):
        return f"tool '{spec.name}' takes an object of arguments, got {_json_type(arguments)}"
    unknown = [k for k in arguments if k not in spec.hints]
    if unknown:
        return f"tool '{spec.name}' has no argument '{unknown[0]}'; its arguments are: {', '.join(spec.hints) or 'none'}"
    missing = [k for k in spec.required if k not in arguments]
    if missing:
        return f"tool '{spec.name}' is missing argument '{missing[0]}'"
    for key, value in arguments.items():
        problem = check_value(value, spec.hints[key])
        if problem:
            return f"tool '{spec.name}' got argument '{key}' of type {problem}"
    return None
