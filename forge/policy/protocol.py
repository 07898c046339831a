"""The turn protocol: parse an assistant turn, render tool results. Never raises on any text.

An assistant turn is optional `<think>...</think>` blocks, then either one or more
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` or one `<answer>...</answer>`.
Results come back as `<tool_result name="...">...</tool_result>`. The parser reports every
problem as a `ProtocolError` (a kind for the metrics, a message for the policy) instead of
raising, because a policy in training writes malformed turns all the time and must be told
what went wrong to learn the format. Thinking is not removed from the context: the agent loop
keeps the sampled ids, so later turns see it; the parser only skips it when looking for calls.

Departure from chat templates such as Qwen's: the result's opening tag carries the tool name as
an attribute, so it is not the tokenizer's `<tool_result>` special token but plain bytes; the
closing tag is the special token. Tool output that contains a protocol marker is escaped, so a
tool can never inject a special token into the context.

It lives beside the tokenizer that holds its markers, below both users: the agent loop
(`forge.agent_side`) and the OpenAI-compatible gateway (`forge.middleware.gateway`), which
speaks the same protocol to black-box agents.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from forge.policy.tokenizer import PROTOCOL_MARKERS

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")

FORMAT_HINT = (
    'Write <tool_call>{"name": "TOOL", "arguments": {...}}</tool_call> to call a tool, '
    "or <answer>...</answer> to answer."
)


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call: a tool name and its JSON arguments (not yet checked)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ProtocolError:
    """One problem in a turn: `kind` is counted in the metrics, `message` is shown to the policy."""

    kind: str
    message: str


@dataclass
class ParsedTurn:
    """What a turn asked for: tool calls, or an answer, and the problems found on the way."""

    calls: list[ToolCall] = field(default_factory=list)
    answer: str | None = None
    errors: list[ProtocolError] = field(default_factory=list)


def parse_turn(text: str, max_calls: int = 8) -> ParsedTurn:
    """Parse one assistant turn. Any string is accepted; problems land in `errors`."""
    out = ParsedTurn()
    if not isinstance(text, str):
        out.errors.append(ProtocolError("bad_turn", f"a turn must be text, got {type(text).__name__}"))
        return out
    _, body, open_think = split_blocks(text, "<think>", "</think>")
    if open_think:
        out.errors.append(ProtocolError("unclosed_tag", "<think> is never closed; end your thinking with </think>. " + FORMAT_HINT))
        return out
    answers, body, open_answer = split_blocks(body, "<answer>", "</answer>")
    raw_calls, _, open_call = split_blocks(body, "<tool_call>", "</tool_call>")
    for tag, is_open in (("<tool_call>", open_call), ("<answer>", open_answer)):
        if is_open:
            out.errors.append(ProtocolError("unclosed_tag", f"{tag} is never closed; end it with {tag.replace('<', '</')}."))
    if answers and raw_calls:
        out.errors.append(ProtocolError("answer_and_call", "a turn either calls tools or answers, not both; the calls were not run."))
        return out
    if answers:
        out.answer = answers[0].strip()
        return out
    if len(raw_calls) > max_calls:
        out.errors.append(ProtocolError("too_many_calls", f"{len(raw_calls)} tool calls in one turn; at most {max_calls} run per turn."))
        raw_calls = raw_calls[:max_calls]
    for i, raw in enumerate(raw_calls, 1):
        call = _parse_call(raw, i, out.errors)
        if call is not None:
            out.calls.append(call)
    if not raw_calls and not out.errors:
        out.errors.append(ProtocolError("no_action", "the turn has no tool call and no answer. " + FORMAT_HINT))
    return out


def split_blocks(text: str, open_tag: str, close_tag: str) -> tuple[list[str], str, bool]:
    """(contents of each open..close block, the text outside them, whether one is left open).

    A scan with str.find rather than a lazy regex, so that a turn full of unclosed tags costs
    linear time, not quadratic.
    """
    inner: list[str] = []
    outside: list[str] = []
    pos = 0
    while True:
        start = text.find(open_tag, pos)
        end = -1 if start < 0 else text.find(close_tag, start + len(open_tag))
        if end < 0:
            outside.append(text[pos:])
            return inner, "".join(outside), start >= 0
        outside.append(text[pos:start])
        inner.append(text[start + len(open_tag) : end])
        pos = end + len(close_tag)


def _parse_call(raw: str, index: int, errors: list[ProtocolError]) -> ToolCall | None:
    try:
        obj = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
        # A lone surrogate escape ("\ud800") decodes but is no text: a tool, or a client reading
        # the call through the gateway, could not encode it.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        errors.append(ProtocolError("bad_json", f"tool call {index} escapes half a character (a lone \\u surrogate); "
                                                "escape whole characters. " + FORMAT_HINT))
        return None
    except (ValueError, RecursionError) as exc:
        errors.append(ProtocolError("bad_json", f"tool call {index} is not valid JSON ({_short(exc)}). " + FORMAT_HINT))
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        errors.append(ProtocolError("bad_call", f'tool call {index} must be an object with a "name" string. ' + FORMAT_HINT))
        return None
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        errors.append(ProtocolError("bad_arguments", f'tool call {index} ({escape_markers(obj["name"])!r}): "arguments" must be an object.'))
        return None
    return ToolCall(obj["name"], args)


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity; JSON has no such values, and OpenAI's clients refuse them.
    raise ValueError(f"{name} is not a JSON value; write a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]} is too large for a number")
    return value


def _short(exc: BaseException) -> str:
    return str(exc).split("\n")[0][:200]


def escape_markers(text: str) -> str:
    """Text with every protocol marker defused (`<` as `&lt;`), so it stays plain bytes."""
    for marker in PROTOCOL_MARKERS:
        if marker in text:
            text = text.replace(marker, "&lt;" + marker[1:])
    return text


def render_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """A well-formed call, as a policy (or an env's oracle) writes it."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


_RESULT = re.compile(r'<tool_result name="([^"]*)">(.*?)</tool_result>', re.DOTALL)


def tool_results(observation: str) -> list[str]:
    """The contents of the tool results in an observation, in order (what an oracle reads)."""
    return [content for _, content in _RESULT.findall(observation)]


def render_tool_result(name: str, content: str, escape: bool = True) -> str:
    """`<tool_result name="...">content</tool_result>`; `escape=False` only for the env's own text."""
    safe_name = _NAME_CHARS.sub("_", name)[:64] or "_"
    body = escape_markers(content) if escape else content
    return f'<tool_result name="{safe_name}">{body}</tool_result>'
