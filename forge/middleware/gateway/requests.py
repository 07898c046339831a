"""Chat Completions requests: checked field by field, with OpenAI's error format.

Every problem is a `GatewayError` with the HTTP status, OpenAI's error `type`, the offending
`param` and a message that says what to send instead; the server turns it into
`{"error": {"message", "type", "param", "code"}}`, as the official clients expect.
Fields this gateway does not implement are refused when they would change what is sampled
(penalties, logit_bias), and ignored when they cannot (metadata, store, parallel_tool_calls).
"""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4


class GatewayError(Exception):
    """A request the gateway answers with a 4xx (or 5xx) error in OpenAI's format."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        message = _one_line(message)
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked request: what to encode and how to sample it."""

    model: str
    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: Any = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    ignore_eos: bool = False
    """vLLM's extension: sample `max_tokens` whatever the policy writes (no stop at <eos> or
    </answer>; `stop` strings still apply); for benchmarks that need equal work per request."""


_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxstring, _PREVIEW.maxother = 3, 60, 60
_LONG_WORD = re.compile(r"\S{201,}")


def preview(value: Any) -> str:
    """A short repr of a client's value for an error message (bounded, whatever its size or depth)."""
    return _PREVIEW.repr(value)


def _one_line(text: str) -> str:
    """An error message as one printable line of at most ~1000 characters: control characters,
    line separators and lone surrogates (which no UTF-8 body can carry) escaped, long words and
    long messages shortened in the middle, where the fix (at the end) survives."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)
    text = _LONG_WORD.sub(lambda m: f"{m[0][:120]}...({len(m[0])} characters)...{m[0][-40:]}", text)
    return text if len(text) <= 1000 else f"{text[:700]}...({len(text)} characters)...{text[-250:]}"


def finite_number(value: Any) -> float | None:
    """`value` as a float if it is a JSON number that a float holds finitely (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if finite_number(value) is None:
        raise GatewayError(f"'{name}' must be a finite number, got {preview(value)}", param=name)
    if value < lo or value > hi or (lo_open and value == lo):
        side = "(" if lo_open else "["
        raise GatewayError(f"'{name}' must be in {side}{lo}, {hi}], got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GatewayError(f"'{name}' must be an integer, got {preview(value)}", param=name)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise GatewayError(f"'{name}' must be {bound}, got {value}", param=name)
    return value


def parse_chat_request(body: Any, *, served: str) -> ChatRequest:
    """Check a decoded JSON body; GatewayError names the first field that is wrong."""
    if not isinstance(body, dict):
        raise GatewayError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(f"'model' is required; this gateway serves '{served}'", param="model")
    if model != served:
        raise GatewayError(f"The model '{model}' does not exist; this gateway serves '{served}' (GET /v1/models)",
                           status=404, param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise GatewayError("'messages' must be a non-empty list of message objects", param="messages")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise GatewayError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects", param="tools")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise GatewayError(f"'{name}' is not supported: the gateway samples exactly the policy's distribution "
                               "(what RL trains on); leave it out", param=name)
    if body.get("logit_bias"):
        raise GatewayError("'logit_bias' is not supported: the gateway samples exactly the policy's distribution; "
                           "leave it out", param="logit_bias")
    req = ChatRequest(model=model, messages=messages, tools=tools or None, user=body.get("user"))
    req.tool_choice = _tool_choice(body.get("tool_choice", "auto"), tools)
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    req.max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1)
    req.n = _integer(body, "n", 1, MAX_N) or 1
    req.seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    req.stop = _stop(body.get("stop"))
    req.logprobs = _flag(body, "logprobs")
    req.top_logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if req.top_logprobs and not req.logprobs:
        raise GatewayError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    req.stream = _flag(body, "stream")
    req.ignore_eos = _flag(body, "ignore_eos")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise GatewayError("'stream_options' must be an object such as {\"include_usage\": true}", param="stream_options")
        if not req.stream:
            raise GatewayError("'stream_options' is only allowed with 'stream': true", param="stream_options")
        req.include_usage = bool(options.get("include_usage", False))
    if req.user is not None and not isinstance(req.user, str):
        raise GatewayError(f"'user' must be a string, got {type(req.user).__name__}", param="user")
    return req


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise GatewayError(f"'{name}' must be true or false, got {preview(value)}", param=name)
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise GatewayError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    return stops


def _tool_choice(value: Any, tools: Any) -> Any:
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise GatewayError("'tool_choice': 'required' needs 'tools'", param="tool_choice")
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        functions = [t.get("function") for t in tools or [] if isinstance(t, dict)]
        known = [f.get("name") for f in functions if isinstance(f, dict)]
        if name not in known:
            raise GatewayError(f"'tool_choice' names function {preview(name)}, which is not in 'tools' ({preview(known)})",
                               param="tool_choice")
        return value
    raise GatewayError("'tool_choice' must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
