"""The OpenAI-compatible gateway, through the official `openai` client against a live server.

Two servers run for the module on 127.0.0.1: one over a tiny random-weight model on the CPU
(real sampling, real logprobs, real batching), and one over a scripted generator whose output
is chosen by the prompt's text, so tool calls, malformed turns and stop strings are
deterministic. Every check reads what the client got and what the session recorded, token for
token. The `BatchingEngine` is also tested alone, with a generator the test holds at a gate so
that which requests share a call does not depend on timing.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import httpx
import openai
import pytest
import torch
from openai import AsyncOpenAI, OpenAI

from forge.middleware.gateway.app import GatewayConfig, create_app
from forge.middleware.gateway.engine import BatchingEngine
from forge.middleware.gateway.server import GatewayServer
from forge.middleware.gateway.sessions import SessionStore, session_trajectories
from forge.policy.config import ModelConfig
from forge.policy.generation import ModelGenerator
from forge.policy.model import Transformer
from forge.policy.sampling import Completion, SamplingParams
from forge.policy.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MODEL = "forge-policy"
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
TOOLS = [{"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
TOOL_CALL = '<tool_call>{"name": "calculate", "arguments": {"expression": "2+3"}}</tool_call>'
BAD_JSON_CALL = '<tool_call>{"name": "calculate", "arguments": {2+3}}</tool_call>'
STOP_TEXT = "The answer is 5 XYZ and then more text"


@dataclass
class Gateway:
    """A live gateway and the objects behind it, for the tests to compare with."""

    server: GatewayServer
    engine: BatchingEngine
    store: SessionStore

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def root(self) -> str:
        return self.server.base_url.removesuffix("/v1")

    def client(self, session: str | None = None) -> OpenAI:
        # No retries: the client retries 409s and 5xx, which would hide (and slow) the errors tested.
        headers = {"X-Forge-Session": session} if session else None
        return OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=60, default_headers=headers)

    def record(self, session: str) -> list[dict]:
        response = httpx.get(f"{self.root}/forge/sessions/{session}", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["calls"]


def serve(generator, config: GatewayConfig) -> Gateway:
    engine = BatchingEngine(generator)
    store = SessionStore()
    server = GatewayServer(create_app(engine, TOK, store, config, policy_version=lambda: 3)).start()
    return Gateway(server, engine, store)


def shut(gateway: Gateway) -> None:
    gateway.server.stop()
    gateway.engine.close()


class ScriptedGenerator:
    """A `Generator` that answers each prompt with `script(prompt_text)` ids, logprob -0.5 each.

    It behaves as a sampler does: the output ends after the first stop id, or at max_new_tokens
    (finish 'length'); top logprobs put the chosen id first.
    """

    def __init__(self, script: Callable[[str], list[int]]) -> None:
        self.script = script
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        self.calls.append(([list(p) for p in prompts], params))
        out = []
        for prompt in prompts:
            ids = self.script(TOK.decode(prompt))
            end = next((i + 1 for i, t in enumerate(ids) if t in params.stop_token_ids), None)
            finish = "stop" if end is not None and end <= params.max_new_tokens else "length"
            ids = ids[: min(end or len(ids), params.max_new_tokens)]
            completion = Completion(ids, [-0.5] * len(ids), finish, policy_version=3)
            if params.top_logprobs:
                completion.extra["top_logprobs"] = [
                    [(t, -0.5)] + [((t + k) % 256, -2.0 - k) for k in range(1, params.top_logprobs)] for t in ids]
            out.append(completion)
        return out


def text_ids(text: str) -> list[int]:
    """A turn as the policy samples it: the text's ids, then <eos> unless </answer> ends it."""
    ids = TOK.encode(text)
    return ids if text.endswith("</answer>") else ids + [TOK.eos_id]


def random_bytes_ids() -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(256) for _ in range(40)] + [TOK.eos_id]


def script(prompt: str) -> list[int]:
    """What the scripted policy writes, chosen by a marker in the task (or the tool results so far)."""
    if "[explode]" in prompt:
        raise RuntimeError("the scripted policy exploded")
    if "[bad json]" in prompt:
        return text_ids(BAD_JSON_CALL)
    if "[random bytes]" in prompt:
        return random_bytes_ids()
    if "[stop]" in prompt:
        return text_ids(STOP_TEXT)
    if prompt.count("</tool_result>") >= 2:
        return text_ids("<answer>5</answer>")
    return text_ids(TOOL_CALL)


@pytest.fixture(scope="module")
def model_gw():
    """The gateway over a tiny random-weight model on the CPU."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=16, rotary_dim=16, num_experts=4, top_k=2, expert_width=32, dense_layers=1,
                      dense_width=64)
    generator = ModelGenerator(Transformer(cfg), TOK, seed=0)
    gateway = serve(generator, GatewayConfig(default_max_tokens=12, max_context_tokens=512))
    yield gateway
    shut(gateway)


@pytest.fixture(scope="module")
def scripted_gw():
    """The gateway over `ScriptedGenerator(script)`."""
    gateway = serve(ScriptedGenerator(script), GatewayConfig(default_max_tokens=200, max_context_tokens=4096))
    yield gateway
    shut(gateway)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None,
                        code: str | None = None) -> dict:
    """The response is OpenAI's error format with this status (and param, code); its error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_models_list_and_retrieve(model_gw):
    client = model_gw.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (models.data[0].object, models.data[0].owned_by) == ("model", "forge")
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.created) == (MODEL, "model", models.data[0].created)
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert_openai_error(info.value.response, 404, param="model", code="model_not_found")


def test_completion_fields_and_usage_match_the_session(model_gw):
    before = time.time()
    r = model_gw.client("schema").chat.completions.create(
        model=MODEL, messages=ask("What is 2+3?"), n=2, seed=5, max_tokens=8)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert isinstance(r.created, int) and before - 2 <= r.created <= time.time() + 2
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.message.role == "assistant"
        assert choice.finish_reason in FINISH_REASONS
        assert choice.logprobs is None
    calls = model_gw.record("schema")
    assert len(calls) == 2
    assert r.usage.prompt_tokens == len(calls[0]["prompt_token_ids"]) == len(calls[1]["prompt_token_ids"])
    assert r.usage.completion_tokens == sum(len(c["completion_token_ids"]) for c in calls)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(1 <= len(c["completion_token_ids"]) <= 8 for c in calls)
    # Sessions keep the sampler's reason; a tool call stops at <eos> like any turn.
    assert [c["finish_reason"] for c in calls] == [{"tool_calls": "stop"}.get(c.finish_reason, c.finish_reason)
                                                   for c in r.choices]


def test_stream_equals_the_non_stream_answer_when_greedy(model_gw):
    kwargs = dict(model=MODEL, messages=ask("Say something."), temperature=0, max_tokens=12)
    plain = model_gw.client("plain").chat.completions.create(**kwargs)
    stream = model_gw.client("streamed").chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant"
    assert "".join(d.delta.content or "" for d in deltas) == (plain.choices[0].message.content or "")
    assert [d.finish_reason for d in deltas if d.finish_reason] == [plain.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and not chunks[-1].choices and chunks[-1].usage is not None
    assert usage[0].model_dump() == plain.usage.model_dump()
    assert model_gw.record("streamed") == model_gw.record("plain")


def test_stream_sends_tool_calls_as_tool_call_deltas(scripted_gw):
    stream = scripted_gw.client("stream-tool").chat.completions.create(
        model=MODEL, messages=ask("What is 2+3?"), tools=TOOLS, stream=True, stream_options={"include_usage": True})
    calls: dict[int, dict] = {}
    finish = []
    content = ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish += [choice.finish_reason] if choice.finish_reason else []
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += call.id or ""
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
    assert content == "" and finish == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "calculate"
    assert json.loads(calls[0]["arguments"]) == {"expression": "2+3"}
    assert chunk.usage.completion_tokens == len(text_ids(TOOL_CALL))


def test_tool_call_output_is_a_tool_call_message(scripted_gw):
    r = scripted_gw.client("tools").chat.completions.create(model=MODEL, messages=ask("What is 2+3?"), tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "calculate"
    assert json.loads(call.function.arguments) == {"expression": "2+3"}
    (record,) = scripted_gw.record("tools")
    assert record["completion_token_ids"] == text_ids(TOOL_CALL)
    assert record["logprobs"] == [-0.5] * len(text_ids(TOOL_CALL))
    assert (record["finish_reason"], record["policy_version"]) == ("stop", 3)


@pytest.mark.parametrize("marker, expected", [
    ("[bad json]", BAD_JSON_CALL),
    ("[random bytes]", TOK.decode(random_bytes_ids()[:-1]).strip()),
], ids=["bad-json-in-tool-call", "random-bytes"])
def test_output_that_does_not_parse_comes_back_as_content(scripted_gw, marker, expected):
    r = scripted_gw.client(f"unparsed-{marker}").chat.completions.create(
        model=MODEL, messages=ask(f"What is 2+3? {marker}"), tools=TOOLS)
    choice = r.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content == expected
    assert choice.finish_reason == "stop"
    (record,) = scripted_gw.record(f"unparsed-{marker}")
    assert record["completion_token_ids"] == script(marker)


def test_generator_failure_is_a_500_and_the_server_serves_on(scripted_gw):
    client = scripted_gw.client()
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=ask("[explode]"))
    error = assert_openai_error(info.value.response, 500)
    assert "the scripted policy exploded" in error["message"]
    r = client.chat.completions.create(model=MODEL, messages=ask("What is 2+3?"), tools=TOOLS)
    assert r.choices[0].finish_reason == "tool_calls"


def test_logprobs_match_the_session_record(model_gw):
    r = model_gw.client("logprobs").chat.completions.create(
        model=MODEL, messages=ask("Count to three."), logprobs=True, top_logprobs=3, seed=11, max_tokens=10)
    entries = r.choices[0].logprobs.content
    (record,) = model_gw.record("logprobs")
    assert len(entries) == len(record["completion_token_ids"]) == r.usage.completion_tokens
    assert [e.logprob for e in entries] == record["logprobs"]
    for entry, token_id in zip(entries, record["completion_token_ids"]):
        assert entry.token == TOK.decode([token_id])
        if token_id < 256:
            assert entry.bytes == [token_id]
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert all(math.isfinite(t) and t <= 0 for t in tops)
        assert entry.logprob <= tops[0] + 1e-6


def test_greedy_tokens_are_the_top_logprob(model_gw):
    r = model_gw.client().chat.completions.create(
        model=MODEL, messages=ask("Count to three."), logprobs=True, top_logprobs=2, temperature=0, max_tokens=6)
    for entry in r.choices[0].logprobs.content:
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)


def test_session_header_and_user_field_both_record(model_gw):
    model_gw.client("by-header").chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4)
    model_gw.client().chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4,
                                              extra_headers={"X-Forge-Session": "by-extra-header"})
    model_gw.client().chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4, user="by-user")
    # The header wins over the user field.
    model_gw.client("header-wins").chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4,
                                                           user="user-loses")
    for session in ("by-header", "by-extra-header", "by-user", "header-wins"):
        (call,) = model_gw.record(session)
        assert set(call) >= {"prompt_token_ids", "completion_token_ids", "logprobs", "policy_version",
                             "finish_reason", "prefix_broken", "rerendered"}
        assert call["prompt_token_ids"] == [TOK.bos_id] + TOK.encode("hi")
        assert len(call["completion_token_ids"]) == len(call["logprobs"]) <= 4
        assert call["policy_version"] == 0 and call["finish_reason"] in FINISH_REASONS
    with pytest.raises(KeyError):
        model_gw.store.get("user-loses")
    missing = httpx.get(f"{model_gw.root}/forge/sessions/never-opened", timeout=30)
    assert_openai_error(missing, 404, param="session")
    health = httpx.get(f"{model_gw.root}/forge/health", timeout=30).json()
    assert health["status"] == "ok" and health["policy_version"] == 3


def test_reward_closes_the_session(model_gw):
    client = model_gw.client("rewarded")
    client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4)
    url = f"{model_gw.root}/forge/sessions/rewarded/reward"
    for bad in ({"reward": "1.0"}, {"reward": True}, {"reward": None}, {"score": 1.0}, [1.0]):
        assert_openai_error(httpx.post(url, json=bad, timeout=30), 400, param="reward")
    for raw in (b'{"reward": NaN}', b'{"reward": Infinity}', b'{"reward": -Infinity}', b"not json"):
        assert_openai_error(httpx.post(url, content=raw, headers={"Content-Type": "application/json"}, timeout=30), 400)
    assert not model_gw.store.get("rewarded").closed
    done = httpx.post(url, json={"reward": 1.0}, timeout=30)
    assert done.status_code == 200 and done.json() == {"id": "rewarded", "reward": 1.0, "calls": 1}
    state = httpx.get(f"{model_gw.root}/forge/sessions/rewarded", timeout=30).json()
    assert (state["reward"], state["closed"], len(state["calls"])) == (1.0, True, 1)
    with pytest.raises(openai.ConflictError) as info:
        client.chat.completions.create(model=MODEL, messages=ask("hi again"), max_tokens=4)
    assert info.value.status_code == 409
    assert_openai_error(info.value.response, 409, param="session")
    assert_openai_error(httpx.post(url, json={"reward": 0.0}, timeout=30), 409, param="session")
    # A reward for a session no call opened (a mistyped id) is refused, not recorded.
    typo = httpx.post(f"{model_gw.root}/forge/sessions/rewardd/reward", json={"reward": 1.0}, timeout=30)
    assert_openai_error(typo, 404, param="session")
    assert len(model_gw.store.get("rewarded").calls) == 1 and model_gw.store.get("rewarded").reward == 1.0


def test_a_conversation_is_one_token_exact_prefix(scripted_gw):
    client = scripted_gw.client("conversation")
    messages = ask("What is 2+3? Then check it.")
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    for _ in range(2):
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        # The assistant message as the client got it, then the tool's result.
        messages = messages + [message.model_dump(exclude_none=True),
                               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "5"}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert reply.choices[0].message.content == "5" and reply.choices[0].finish_reason == "stop"

    calls = scripted_gw.record("conversation")
    assert len(calls) == 3
    for prev, call in zip(calls, calls[1:]):
        context = prev["prompt_token_ids"] + prev["completion_token_ids"]
        assert call["prompt_token_ids"][: len(context)] == context
        observation = TOK.decode(call["prompt_token_ids"][len(context):])
        assert observation == '<tool_result name="calculate">5</tool_result>\n'
        assert (call["prefix_broken"], call["rerendered"]) == (False, 0)

    (traj,) = session_trajectories(scripted_gw.store.get("conversation"), task_id="t", group_id="g")
    assert traj.token_ids == calls[-1]["prompt_token_ids"] + calls[-1]["completion_token_ids"]
    assert traj.prompt_ids == calls[0]["prompt_token_ids"]
    sampled = [lp for lp, keep in zip(traj.sampling_logprobs, traj.loss_mask) if keep]
    assert sampled == [lp for call in calls for lp in call["logprobs"]]
    assert [t.sampled_ids for t in traj.turns] == [c["completion_token_ids"] for c in calls]

    # The client edits its first tool call: that message is tokenized anew and the prefix breaks.
    edited = json.loads(json.dumps(messages))
    edited[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"expression": "2 + 3"})
    client.chat.completions.create(model=MODEL, messages=edited, tools=TOOLS)
    last = scripted_gw.record("conversation")[-1]
    assert (last["prefix_broken"], last["rerendered"]) == (True, 1)
    trajs = session_trajectories(scripted_gw.store.get("conversation"), task_id="t", group_id="g")
    assert len(trajs) == 2 and trajs[1].token_ids == last["prompt_token_ids"] + last["completion_token_ids"]


def test_content_reply_sent_back_is_reused_exactly(model_gw):
    client = model_gw.client("content-reply")
    messages = ask("Tell me a story.")
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=2)
    messages += [reply.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "Go on."}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=3)
    first, second = model_gw.record("content-reply")
    context = first["prompt_token_ids"] + first["completion_token_ids"]
    assert second["prompt_token_ids"] == context + TOK.encode("Go on.\n")
    assert (second["prefix_broken"], second["rerendered"]) == (False, 0)


def test_concurrent_sessions_share_engine_calls(model_gw):
    calls_before, requests_before = model_gw.engine.stats.calls, model_gw.engine.stats.requests

    async def run() -> list:
        async with AsyncOpenAI(base_url=model_gw.base_url, api_key="unused", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*[
                client.chat.completions.create(model=MODEL, messages=ask(f"task {i}"), max_tokens=6,
                                               extra_headers={"X-Forge-Session": f"concurrent-{i}"})
                for i in range(32)])

    replies = asyncio.run(run())
    assert len(replies) == 32
    for i, reply in enumerate(replies):
        assert reply.choices[0].finish_reason in FINISH_REASONS
        (call,) = model_gw.store.get(f"concurrent-{i}").calls
        assert call.prompt_token_ids == [TOK.bos_id] + TOK.encode(f"task {i}")
        assert len(call.completion_token_ids) == reply.usage.completion_tokens
    assert model_gw.engine.stats.requests - requests_before == 32
    assert model_gw.engine.stats.calls - calls_before < 32


LONG = "x" * 600  # past the model gateway's 512-token context
BAD_REQUESTS = [
    ("unknown-model", dict(model="gpt-4o", messages=ask("hi")), openai.NotFoundError, 404, "model", "model_not_found"),
    ("role-robot", dict(model=MODEL, messages=[{"role": "robot", "content": "hi"}]),
     openai.BadRequestError, 400, "messages", None),
    ("tool-without-call",
     dict(model=MODEL, messages=ask("hi") + [{"role": "tool", "tool_call_id": "c", "content": "5"}]),
     openai.BadRequestError, 400, "messages", None),
    ("ends-with-assistant", dict(model=MODEL, messages=ask("hi") + [{"role": "assistant", "content": "ok"}]),
     openai.BadRequestError, 400, "messages", None),
    ("past-the-context", dict(model=MODEL, messages=ask(LONG)),
     openai.BadRequestError, 400, "messages", "context_length_exceeded"),
    ("negative-max-tokens", dict(model=MODEL, messages=ask("hi"), max_tokens=-3),
     openai.BadRequestError, 400, "max_tokens", None),
    ("top-logprobs-without-logprobs", dict(model=MODEL, messages=ask("hi"), top_logprobs=3),
     openai.BadRequestError, 400, "top_logprobs", None),
    ("n-zero", dict(model=MODEL, messages=ask("hi"), n=0), openai.BadRequestError, 400, "n", None),
    ("temperature-5", dict(model=MODEL, messages=ask("hi"), temperature=5), openai.BadRequestError, 400,
     "temperature", None),
]


def send_bad_requests(gateway: Gateway) -> None:
    client = gateway.client("bad-requests")
    for _, kwargs, error, status, param, code in BAD_REQUESTS:
        with pytest.raises(error) as info:
            client.chat.completions.create(**kwargs)
        assert info.value.status_code == status
        assert set(info.value.body) == {"message", "type", "param", "code"}
        assert_openai_error(info.value.response, status, param=param, code=code)
    url = f"{gateway.base_url}/chat/completions"
    for raw in (b'{"model": "forge-policy", "messages": [', b"", b"[1, 2]", b'"a string"'):
        response = httpx.post(url, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert_openai_error(response, 400)
    assert_openai_error(httpx.get(f"{gateway.base_url}/no/such/route", timeout=30), 404)


@pytest.mark.parametrize("name, kwargs, error, status, param, code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_an_openai_error(model_gw, name, kwargs, error, status, param, code):
    with pytest.raises(error) as info:
        model_gw.client().chat.completions.create(**kwargs)
    assert info.value.status_code == status
    assert (info.value.param, info.value.code) == (param, code)
    assert_openai_error(info.value.response, status, param=param, code=code)


def test_malformed_json_body_is_a_400(model_gw):
    response = httpx.post(f"{model_gw.base_url}/chat/completions", content=b'{"model": "forge-policy", "messages": [',
                          headers={"Content-Type": "application/json"}, timeout=30)
    error = assert_openai_error(response, 400)
    assert "JSON" in error["message"]


def test_server_keeps_serving_after_bad_requests(model_gw):
    send_bad_requests(model_gw)
    assert model_gw.store.get("bad-requests").calls == []
    r = model_gw.client("after-bad").chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4)
    assert r.choices[0].finish_reason in FINISH_REASONS
    assert len(model_gw.record("after-bad")) == 1


def test_stop_string_cuts_content_and_record(scripted_gw):
    r = scripted_gw.client("stop-string").chat.completions.create(
        model=MODEL, messages=ask("What is 2+3? [stop]"), stop=["XYZ"])
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert "XYZ" not in choice.message.content
    assert STOP_TEXT.startswith(choice.message.content) and choice.message.content.rstrip() == "The answer is 5"
    (record,) = scripted_gw.record("stop-string")
    cut = STOP_TEXT[: STOP_TEXT.index("XYZ") + 3]
    assert record["completion_token_ids"] == TOK.encode(cut)
    assert record["finish_reason"] == "stop"
    assert r.usage.completion_tokens == len(record["completion_token_ids"])


def test_stop_string_in_a_stream(scripted_gw):
    stream = scripted_gw.client().chat.completions.create(
        model=MODEL, messages=ask("What is 2+3? [stop]"), stop="XYZ", stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.rstrip() == "The answer is 5"
    assert chunks[-1].usage.completion_tokens == len(TOK.encode(STOP_TEXT[: STOP_TEXT.index("XYZ") + 3]))


STOP_ID = 999
BLOCK, FAIL = -1, -2


class GatedGenerator:
    """Writes [10, 11, 12, 13, 14, STOP_ID] (cut at max_new_tokens); a prompt starting with
    BLOCK holds its call until `gate` is set, one starting with FAIL raises."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def generate(self, prompts, params):
        if prompts[0][0] == BLOCK:
            self.entered.set()
            assert self.gate.wait(30)
            return [Completion([10], [-0.1], "length", 5) for _ in prompts]
        if prompts[0][0] == FAIL:
            raise RuntimeError("generator failed")
        self.calls.append(([list(p) for p in prompts], params))
        ids = [10, 11, 12, 13, 14, STOP_ID][: params.max_new_tokens]
        finish = "stop" if ids[-1] in params.stop_token_ids else "length"
        extra = {"top_logprobs": [[(t, -0.1), (t + 1, -3.0), (t + 2, -4.0)][: params.top_logprobs] for t in ids]}
        return [Completion(list(ids), [-0.1 * (k + 1) for k in range(len(ids))], finish, 5,
                           extra if params.top_logprobs else {}) for _ in prompts]


@pytest.fixture
def gated():
    generator = GatedGenerator()
    engine = BatchingEngine(generator, gather_s=0.005, max_gather_s=0.05)
    # Hold the engine in a call, so that what the test submits next waits together.
    blocker = engine.submit([BLOCK], SamplingParams(max_new_tokens=1))
    assert generator.entered.wait(30)
    yield generator, engine
    generator.gate.set()
    blocker.result(timeout=30)
    engine.close()


def test_engine_cuts_each_request_to_its_own_budget(gated):
    generator, engine = gated
    params = SamplingParams(temperature=0.0, stop_token_ids=(STOP_ID,))
    short = engine.submit([1, 2], replace(params, max_new_tokens=3))
    long = engine.submit([1, 2, 3], replace(params, max_new_tokens=10, top_logprobs=2))
    generator.gate.set()
    (a,), (b,) = short.result(timeout=30), long.result(timeout=30)
    ((prompts, used),) = generator.calls
    assert prompts == [[1, 2], [1, 2, 3]] and used.max_new_tokens == 10 and used.top_logprobs == 2
    assert (a.token_ids, a.logprobs, a.finish_reason) == ([10, 11, 12], [-0.1, -0.2, -0.30000000000000004], "length")
    assert "top_logprobs" not in a.extra
    assert (b.token_ids, b.finish_reason) == ([10, 11, 12, 13, 14, STOP_ID], "stop")
    assert [len(row) for row in b.extra["top_logprobs"]] == [2] * 6
    # The blocker's call counts too.
    assert (engine.stats.requests, engine.stats.calls, engine.stats.rows) == (3, 2, 3)
    assert engine.stats.max_rows_in_call == 2


def test_engine_serves_n_as_n_completions(gated):
    generator, engine = gated
    future = engine.submit([7, 8], SamplingParams(max_new_tokens=4), n=3)
    generator.gate.set()
    done = future.result(timeout=30)
    assert len(done) == 3 and all(c.token_ids == [10, 11, 12, 13] for c in done)
    ((prompts, _),) = generator.calls
    assert prompts == [[7, 8]] * 3
    with pytest.raises(ValueError):
        engine.submit([7], SamplingParams(), n=0)


def test_engine_groups_requests_by_sampling_settings(gated):
    generator, engine = gated
    greedy = SamplingParams(temperature=0.0, max_new_tokens=2)
    hot = SamplingParams(temperature=1.0, max_new_tokens=2)
    futures = [engine.submit([1], greedy), engine.submit([2], hot), engine.submit([3], greedy),
               engine.submit([4], hot, seed=9), engine.submit([5], replace(greedy, max_new_tokens=5))]
    generator.gate.set()
    assert all(len(f.result(timeout=30)) == 1 for f in futures)
    batches = sorted((sorted(p[0] for p in prompts), params.temperature) for prompts, params in generator.calls)
    assert batches == [([1, 3, 5], 0.0), ([2], 1.0), ([4], 1.0)]
    assert (engine.stats.requests, engine.stats.calls) == (6, 4)


def test_engine_failure_reaches_the_future_and_the_engine_serves_on(gated):
    generator, engine = gated
    generator.gate.set()
    failed = engine.submit([FAIL], SamplingParams(max_new_tokens=2))
    assert isinstance(failed.exception(timeout=30), RuntimeError)
    ok = engine.submit([1], SamplingParams(max_new_tokens=2))
    assert ok.result(timeout=30)[0].token_ids == [10, 11]

    async def both():
        with pytest.raises(RuntimeError, match="generator failed"):
            await engine.generate([FAIL], SamplingParams(max_new_tokens=2))
        return await engine.generate([1], SamplingParams(max_new_tokens=3))

    assert asyncio.run(both())[0].token_ids == [10, 11, 12]


class PipelinedGenerator:
    """A generator with `prefill` / `generate_prefilled`; a prefill whose first prompt starts with
    BLOCK holds until `gate` is set, one starting with FAIL raises. Logs what happened in order."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.log: list[tuple] = []

    def reseed(self, seed: int) -> None:
        self.log.append(("reseed", seed))

    def prefill(self, prompts):
        self.log.append(("prefill", [p[0] for p in prompts]))
        if prompts[0][0] == BLOCK:
            self.entered.set()
            assert self.gate.wait(30)
        if prompts[0][0] == FAIL:
            raise RuntimeError("prefill failed")
        return [list(p) for p in prompts]

    def generate(self, prompts, params):  # what an engine without prefill_early calls
        return self.generate_prefilled([self.prefill(prompts)], params)

    def generate_prefilled(self, parts, params):
        self.log.append(("generate", [[p[0] for p in part] for part in parts], params.max_new_tokens))
        return [Completion([p[0], 7][: params.max_new_tokens], [-0.5, -0.25][: params.max_new_tokens], "length", 0)
                for part in parts for p in part]


@pytest.fixture
def pipelined():
    generator = PipelinedGenerator()
    engine = BatchingEngine(generator, gather_s=0.0, max_gather_s=30.0, prefill_early=True)
    yield generator, engine
    generator.gate.set()
    engine.close()


def test_engine_prefills_requests_as_they_come_and_samples_the_wave_in_one_call(pipelined):
    generator, engine = pipelined
    params = SamplingParams(temperature=1.0, max_new_tokens=2)
    first = engine.submit([BLOCK], params)
    assert generator.entered.wait(30)
    # Arrive while the first batch is prefilling: the next batch of the same call.
    rest = [engine.submit([i], params, n=2 if i == 3 else 1) for i in (1, 2, 3)]
    other = engine.submit([4], replace(params, temperature=0.0))  # other settings: the next call
    generator.gate.set()
    assert [c.token_ids for c in first.result(timeout=30)] == [[BLOCK, 7]]
    assert [[c.token_ids for c in f.result(timeout=30)] for f in rest] == [[[1, 7]], [[2, 7]], [[3, 7], [3, 7]]]
    assert other.result(timeout=30)[0].token_ids == [4, 7]
    assert generator.log == [("prefill", [BLOCK]), ("prefill", [1, 2, 3, 3]), ("generate", [[BLOCK], [1, 2, 3, 3]], 2),
                             ("prefill", [4]), ("generate", [[4]], 2)]
    assert (engine.stats.calls, engine.stats.rows, engine.stats.max_rows_in_call) == (2, 6, 5)


@pytest.mark.parametrize("early", [False, True], ids=["prefill-in-call", "prefill-early"])
def test_engine_waits_for_a_request_the_server_is_still_reading(early):
    generator = PipelinedGenerator()
    engine = BatchingEngine(generator, gather_s=0.0, max_gather_s=30.0, prefill_early=early)
    try:
        params = SamplingParams(max_new_tokens=1)
        with engine.arriving():
            early_request = engine.submit([1], params)
            with engine.arriving():  # a second request still being read: the call waits for it
                time.sleep(0.2)
                assert generator.log == ([("prefill", [1])] if early else [])
                late = engine.submit([2], params)
        assert early_request.result(timeout=30)[0].token_ids == [1] and late.result(timeout=30)[0].token_ids == [2]
        assert generator.log[-1] == (("generate", [[1], [2]], 1) if early else ("generate", [[1, 2]], 1))
        # Reading a request that then fails (a 400) still ends its wait.
        with pytest.raises(ValueError):
            with engine.arriving():
                raise ValueError("bad request")
        assert engine.submit([3], params).result(timeout=30)[0].token_ids == [3]
    finally:
        engine.close()


def test_engine_a_failed_prefill_fails_its_requests_only_and_a_seeded_call_reseeds_first(pipelined):
    generator, engine = pipelined
    params = SamplingParams(max_new_tokens=2)
    with engine.arriving():
        blocked = engine.submit([BLOCK], params)
        assert generator.entered.wait(30)
        failed = engine.submit([FAIL], params)
    generator.gate.set()
    assert isinstance(failed.exception(timeout=30), RuntimeError)
    assert blocked.result(timeout=30)[0].token_ids == [BLOCK, 7]
    assert ("generate", [[BLOCK]], 2) in generator.log
    generator.log.clear()
    assert engine.submit([5], params, seed=11).result(timeout=30)[0].token_ids == [5, 7]
    assert generator.log == [("reseed", 11), ("prefill", [5]), ("reseed", 11), ("generate", [[5]], 2)]


def test_ignore_eos_samples_max_tokens_past_the_protocol_stops(scripted_gw):
    # vLLM's extension, for benchmarks that need the same work per request.
    client = scripted_gw.client("ignore-eos")
    plain = client.chat.completions.create(model=MODEL, messages=ask("What is 2+3?"), max_tokens=500)
    r = client.chat.completions.create(model=MODEL, messages=ask("What is 2+3?"), max_tokens=500,
                                       extra_body={"ignore_eos": True})
    # The generator was asked to stop at nothing; the script's turn then ends at the token budget.
    assert [c["finish_reason"] for c in scripted_gw.record("ignore-eos")] == ["stop", "length"]
    assert r.usage.completion_tokens == plain.usage.completion_tokens  # the script's whole turn, <eos> included
    bad = httpx.post(scripted_gw.base_url + "/chat/completions",
                     json={"model": MODEL, "messages": ask("hi"), "ignore_eos": "yes"})
    assert_openai_error(bad, 400, param="ignore_eos")
