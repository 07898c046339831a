"""The chat template of Forge's OpenAI-compatible gateway: Chat Completions messages <-> token ids.

A black-box agent talks to the policy through the gateway in OpenAI `messages` (+ `tools`); the
policy was trained on `ToolEnv` episodes. This module lays the messages out exactly as an
episode lays out its context, so the policy meets the gateway's prompts in the form it learned:

    [<bos>] + encode(prompt_text)            prompt_text = (system + "\\n\\n") + render_prompt(user)
    + turn ids                               each assistant message, as sampled
    + encode(tool_result... + "\\n")          consecutive tool messages form one observation
    + encode(user + "\\n")                    a later user or system message
    ...

`render_task` is what `ToolEnv.render_prompt` calls too ('full' or 'brief' style), with the
client's tools in the client's order where a ToolEnv sorts them by name. An assistant message the
gateway produced is laid out as its exact sampled ids (`ProducedIndex`), so a multi-turn session
is one token-exact growing prefix, as an episode is, and the trainer sees the sampler's tokens.

Departures from OpenAI and Hugging Face chat templates: this is Forge's turn protocol
(`forge.policy.protocol`), not a model vendor's template. There are no role headers; an answer
is `<answer>...</answer>`, the protocol's only way to answer; reasoning is `<think>` inside the
turn; a tool result names its tool, not its call id. An assistant message the gateway did not
produce, or one the client edited, is tokenized anew: its ids may differ from what was sampled,
which breaks the token-exact prefix (and the prefix cache) from that message on; `EncodedChat`
counts such messages. Unlike a ToolEnv, tool results are neither cut nor made printable: the
client's tools are not the env's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from forge.policy.protocol import parse_turn, render_tool_call, render_tool_result, split_blocks
from forge.policy.tokenizer import Tokenizer

TOOL_STYLES = ("full", "brief")
_SYSTEM_ROLES = ("system", "developer")
_ROLES = (*_SYSTEM_ROLES, "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A request the template cannot lay out; the message says which message and how to fix it."""


@dataclass
class EncodedChat:
    """A conversation as the policy's prompt, and how much of it was reused as sampled."""

    token_ids: list[int]
    """The prompt: <bos>, the first turn's text, then every later message's ids."""
    reused: int = 0
    """Assistant messages laid out as the exact ids the gateway produced."""
    rerendered: int = 0
    """Assistant messages tokenized anew (not produced here, or edited by the client)."""
    tool_names: list[str] = field(default_factory=list)
    """Names of the request's tools, in the client's order."""


def forge_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool `{"type": "function", "function": {...}}` as a Forge schema dict."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(
            f'tool {_preview(tool)} has no function name; write {{"type": "function", '
            '"function": {"name": "NAME", "description": "...", "parameters": {...}}}'
        )
    params = fn.get("parameters")
    if isinstance(params, dict) and not isinstance(params.get("properties", {}), dict):
        raise ChatFormatError(f"tool {_preview(fn['name'])}: parameters.properties must be an object mapping each "
                              f"argument to its JSON schema, got {_preview(params['properties'])}")
    return {
        "name": fn["name"],
        "description": fn.get("description") or "",
        "parameters": params if isinstance(params, dict) else {"type": "object", "properties": {}},
    }


class ProducedIndex:
    """What the gateway produced in one session, to lay a returned assistant message out as sampled."""

    def __init__(self) -> None:
        # Keyed by the first tool call id, or by the content for messages without calls; a
        # later add under the same key replaces the earlier one (latest produced wins).
        self._by_call: dict[str, tuple[list[int], dict[str, Any]]] = {}
        self._by_content: dict[str, tuple[list[int], dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._by_call) + len(self._by_content)

    def add(self, token_ids: Sequence[int], message: dict[str, Any]) -> None:
        """Record the sampled ids of `message`, the assistant message as returned to the client."""
        entry = (list(token_ids), message)
        calls = message.get("tool_calls") or []
        if calls:
            self._by_call[calls[0]["id"]] = entry
        else:
            self._by_content[_text_or_empty(message.get("content"))] = entry

    def find(self, message: dict[str, Any]) -> list[int] | None:
        """The exact ids of a produced message equal to the client's `message`, else None."""
        try:
            return self._find(message)
        except (AttributeError, TypeError, KeyError, ChatFormatError):
            # A malformed message is nobody's produced one; encode re-renders it and reports it.
            return None

    def _find(self, message: dict[str, Any]) -> list[int] | None:
        calls = message.get("tool_calls") or []
        content = _text_or_empty(message.get("content"))
        entry = self._by_call.get(calls[0].get("id")) if calls else self._by_content.get(content)
        if entry is None:
            return None
        ids, produced = entry
        if calls and _call_keys(calls) != _call_keys(produced["tool_calls"]):
            return None
        # Clients send null or "" for the text beside tool calls; any other text is an edit.
        if calls and content not in ("", _text_or_empty(produced.get("content"))):
            return None
        # Clients often drop reasoning_content, so it only counts when sent.
        sent = message.get("reasoning_content")
        if sent is not None and (sent or "") != (produced.get("reasoning_content") or ""):
            return None
        return list(ids)


def _call_keys(calls: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    return [(c.get("id"), c["function"].get("name"), c["function"].get("arguments")) for c in calls]


def visible_text(ids: Sequence[int], tokenizer: Tokenizer) -> str:
    """The text of sampled ids without control tokens (<eos>, <pad>, <bos>): what an env or a
    client reads of a turn."""
    control = {tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id}
    return tokenizer.decode([i for i in ids if i not in control])


def render_task(task: str, schemas: list[dict[str, Any]], style: str) -> str:
    """A task's first observation with its tools: 'full' gives each tool's JSON schema and the
    protocol in words; 'brief' only the tools' signatures (ToolEnv.render_prompt uses this too)."""
    if style == "brief":
        sigs = ", ".join(f"{s['name']}({', '.join(s['parameters'].get('properties') or {})})" for s in schemas)
        return f"{task}\nTools: {sigs}\n"
    tools = "\n".join(json.dumps(s, sort_keys=True) for s in schemas)
    return (
        f"{task}\n\nTools:\n{tools}\n\n"
        "You may think inside <think>...</think>. Then either call tools, each as "
        '<tool_call>{"name": "TOOL", "arguments": {...}}</tool_call>, or give the final answer '
        "as <answer>...</answer>.\n"
    )


class ChatTemplate:
    """OpenAI messages to prompt ids laid out as a ToolEnv episode, and sampled ids back to a message."""

    def __init__(self, tokenizer: Tokenizer, tool_style: str = "full") -> None:
        if tool_style not in TOOL_STYLES:
            raise ValueError(f"tool_style '{tool_style}' is not one of {', '.join(TOOL_STYLES)}")
        self.tokenizer = tokenizer
        self.tool_style = tool_style

    def render_prompt(self, task: str, schemas: list[dict[str, Any]]) -> str:
        """`ToolEnv.render_prompt` of `task` with `schemas`; the bare task when there are no tools."""
        return render_task(task, schemas, self.tool_style) if schemas else task

    def encode(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        produced: ProducedIndex | None = None,
    ) -> EncodedChat:
        """The prompt ids of a Chat Completions request; ChatFormatError names what to fix."""
        if not isinstance(messages, list) or not messages:
            raise ChatFormatError("messages is empty; send at least one user message")
        roles = [_role(m, i) for i, m in enumerate(messages)]
        if roles[-1] == "assistant":
            raise ChatFormatError(
                f"messages[{len(messages) - 1}]: the last message is an assistant message; end with a user "
                "or tool message for the model to answer (or drop it to have it sampled again)"
            )
        if tools is not None and not isinstance(tools, list):
            raise ChatFormatError(f"tools must be a list of function tools, got {type(tools).__name__}")
        schemas = [forge_schema(t) for t in tools or []]
        tok = self.tokenizer
        i, prompt = self._first_turn(messages, roles, schemas)
        out = EncodedChat(token_ids=[tok.bos_id] + self._encode(prompt, f"messages[:{i}]"),
                          tool_names=[s["name"] for s in schemas])
        while i < len(messages):
            role = roles[i]
            if role == "assistant":
                ids = produced.find(messages[i]) if produced is not None else None
                if ids is None:
                    ids = self._assistant_ids(messages[i], i)
                    out.rerendered += 1
                else:
                    out.reused += 1
                out.token_ids.extend(ids)
                i += 1
            elif role == "tool":
                end = i
                while end < len(messages) and roles[end] == "tool":
                    end += 1
                out.token_ids.extend(self._encode(self._observation(messages, i, end), f"messages[{i}:{end}]"))
                i = end
            else:
                out.token_ids.extend(self._encode(_content(messages[i], i) + "\n", f"messages[{i}]"))
                i += 1
        return out

    def _first_turn(self, messages: list[dict[str, Any]], roles: list[str], schemas: list[dict[str, Any]]) -> tuple[int, str]:
        """(index after the first user message, prompt text): leading system text, then the task."""
        system: list[str] = []
        i = 0
        while i < len(roles) and roles[i] in _SYSTEM_ROLES:
            system.append(_content(messages[i], i) + "\n\n")
            i += 1
        if i >= len(roles):
            raise ChatFormatError("messages has no user message; add one holding the task after the system message")
        if roles[i] != "user":
            raise ChatFormatError(
                f"messages[{i}]: role '{roles[i]}' cannot start the conversation; start with an optional "
                "system message and then a user message holding the task"
            )
        return i + 1, "".join(system) + self.render_prompt(_content(messages[i], i), schemas)

    def _assistant_ids(self, message: dict[str, Any], index: int) -> list[int]:
        """An assistant message not produced here, tokenized as a policy would have written it."""
        calls = message.get("tool_calls") or []
        content = message.get("content")
        if content is None and not calls:
            raise ChatFormatError(f"messages[{index}]: an assistant message needs content or tool_calls")
        text = _content(message, index) if content is not None else ""
        reasoning = message.get("reasoning_content")
        think = f"<think>{reasoning}</think>" if isinstance(reasoning, str) and reasoning else ""
        if calls:
            text = think + text + "".join(render_tool_call(name, args) for _, name, args in _calls(message, index))
        else:
            text = f"{think}<answer>{text}</answer>"
        ids = self._encode(text, f"messages[{index}]")
        # As `forge.agent_side.demos.turn_ids`: the sampler stops at </answer>, else at <eos>.
        if not text.rstrip().endswith("</answer>"):
            ids.append(self.tokenizer.eos_id)
        return ids

    def _encode(self, text: str, where: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except UnicodeEncodeError as exc:
            # A JSON escape such as \ud800 decodes to a lone surrogate, which no UTF-8 text holds.
            raise ChatFormatError(f"{where}: the text holds a lone surrogate {exc.object[exc.start]!r} at character "
                                  f"{exc.start}; send whole Unicode characters") from None

    def _observation(self, messages: list[dict[str, Any]], start: int, end: int) -> str:
        """The observation text of the tool messages `messages[start:end]`, as `ToolEnv.step` writes it."""
        prev = messages[start - 1] if start > 0 else {}
        if prev.get("role") != "assistant" or not prev.get("tool_calls"):
            raise ChatFormatError(f"messages[{start}]: role 'tool' must follow an assistant message with tool_calls")
        names = {call_id: name for call_id, name, _ in _calls(prev, start - 1)}
        results = []
        for i in range(start, end):
            call_id = messages[i].get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in names:
                raise ChatFormatError(
                    f"messages[{i}]: tool_call_id {call_id!r} is not a tool call of messages[{start - 1}]; "
                    f"its ids are {', '.join(map(repr, names))}"
                )
            results.append(render_tool_result(names[call_id], _content(messages[i], i)))
        return "".join(results) + "\n"

    def parse(self, completion_ids: Sequence[int], finish_reason: str, call_id_prefix: str) -> tuple[dict[str, Any], str]:
        """(the OpenAI assistant message, the OpenAI finish_reason) of sampled ids; never raises."""
        tok = self.tokenizer
        text = visible_text([i for i in completion_ids if 0 <= i < tok.vocab_size], tok)
        thoughts, visible = split_blocks(text, "<think>", "</think>")[:2]
        # No cap on the calls: every call the policy wrote goes to the client, which decides what
        # to run; a cap would drop calls whose ids stay in the context.
        parsed = parse_turn(text, max_calls=max(1, text.count("<tool_call>")))
        message: dict[str, Any] = {"role": "assistant", "content": None,
                                   "reasoning_content": "\n".join(thoughts) if thoughts else None}
        if parsed.calls:
            message["content"] = split_blocks(visible, "<tool_call>", "</tool_call>")[1].strip() or None
            message["tool_calls"] = [
                {"id": f"{call_id_prefix}_{i}", "type": "function",
                 "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
                for i, call in enumerate(parsed.calls)
            ]
            return message, "tool_calls"
        # Output that does not parse still reaches the client as text: the agent, not the
        # gateway, decides what to do with a malformed turn.
        message["content"] = parsed.answer if parsed.answer is not None else visible.strip()
        return message, "length" if finish_reason == "length" else "stop"


def _role(message: Any, index: int) -> str:
    role = message.get("role") if isinstance(message, dict) else None
    if role not in _ROLES:
        got = f"role {_preview(role)}" if isinstance(message, dict) else f"a {type(message).__name__}"
        raise ChatFormatError(f"messages[{index}]: {got} is not a message; use an object with role one of {', '.join(_ROLES)}")
    return role


def _text_or_empty(content: Any) -> str:
    """Content as text for comparison; None is empty; ChatFormatError on non-text parts."""
    return "" if content is None else _join_text(content, "content")


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        raise ChatFormatError(f"messages[{index}]: role '{message.get('role')}' needs content (a string or text parts)")
    return _join_text(content, f"messages[{index}]")


def _join_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ChatFormatError(
        f'{where}: content must be a string or a list of {{"type": "text", "text": ...}} parts; '
        f"got {_preview(content)} (this model reads text only)"
    )


def _calls(message: dict[str, Any], index: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, name, arguments) of each tool call of an assistant message, checked."""
    out = []
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ChatFormatError(f"messages[{index}].tool_calls must be a list of tool calls, got {_preview(calls)}")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        call_id = call.get("id") if isinstance(call, dict) else None
        if call_id is not None and not isinstance(call_id, str):
            raise ChatFormatError(f"messages[{index}].tool_calls[{k}]: id {_preview(call_id)} must be a string, "
                                  "the id the gateway returned for the call")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f'messages[{index}].tool_calls[{k}]: write {{"id": ..., "type": "function", '
                                  '"function": {"name": ..., "arguments": "{...}"}}')
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError, RecursionError):
            args = None
        if not isinstance(args, dict):
            raise ChatFormatError(f"messages[{index}].tool_calls[{k}]: arguments {_preview(fn.get('arguments'))} "
                                  "must be a string holding a JSON object, e.g. '{\"x\": 1}'")
        out.append((call_id, fn["name"], args))
    return out


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
