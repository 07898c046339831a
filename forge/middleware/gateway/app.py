"""The OpenAI-compatible HTTP API over the policy (FastAPI): what an agent program talks to.

Routes: `GET /v1/models`, `POST /v1/chat/completions` (plain JSON or `stream: true`
server-sent chunks), and Forge's own `GET /forge/sessions/{id}`, `POST
/forge/sessions/{id}/reward`, `DELETE /forge/sessions/{id}` and `GET /forge/health`.

A call is encoded by `forge.policy.chat.ChatTemplate` (the turn protocol, reusing the exact ids
the gateway produced earlier in the session), sampled by the `BatchingEngine` together with
the other sessions' calls, parsed back into an OpenAI message (tool calls, content, reasoning)
and recorded under its session: the `X-Forge-Session` header, else the request's `user`.
A call with neither is served and not recorded.

Streaming sends the finished completion as chunks (role, reasoning, content, tool calls,
finish reason, usage): the clients read it as a stream, but the first chunk comes when the
whole completion is sampled, since the engine decodes a call's rows together.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from forge.middleware.gateway.engine import BatchingEngine
from forge.middleware.gateway.requests import ChatRequest, GatewayError, finite_number, parse_chat_request, preview
from forge.middleware.gateway.sessions import CallRecord, Session, SessionError, SessionStore
from forge.policy.chat import ChatFormatError, ChatTemplate, visible_text
from forge.policy.sampling import Completion, SamplingParams
from forge.policy.tokenizer import Tokenizer

SESSION_HEADER = "X-Forge-Session"


@dataclass
class GatewayConfig:
    """What the app serves and its limits."""

    model_name: str = "forge-policy"
    """The `model` clients must ask for (GET /v1/models lists it)."""
    max_context_tokens: int = 32768
    """Longest prompt + completion; a longer prompt is a 400 (context_length_exceeded)."""
    default_max_tokens: int = 512
    """Completion budget when a request gives neither max_tokens nor max_completion_tokens."""
    tool_style: str = "full"
    """How `tools` are shown to the policy: 'full' (JSON schemas) or 'brief' (signatures)."""


def create_app(engine: BatchingEngine, tokenizer: Tokenizer, store: SessionStore, config: GatewayConfig,
               policy_version: Callable[[], int] = lambda: 0,
               sampling: Callable[[], SamplingParams] | None = None) -> FastAPI:
    """The ASGI app; serve it with uvicorn (`forge.middleware.gateway.server.GatewayServer`).

    `sampling`, when given (training), returns the settings every call is sampled with: its
    temperature and top_p replace the request's, and its max_new_tokens caps the request's
    budget, because the trainer scores every token at the recipe's one temperature.
    """
    # No redirect of '/v1/models/' to '/v1/models': a redirect has no JSON body, and a client that
    # follows one re-sends its POST; a 404 that names the routes says more.
    app = FastAPI(title="Forge gateway", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    template = ChatTemplate(tokenizer, tool_style=config.tool_style)
    stops = (tokenizer.eos_id, tokenizer.token_id("</answer>"))
    created = int(time.time())

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        # A bug: the client still gets OpenAI's format (Starlette logs the traceback after this).
        return JSONResponse(GatewayError(f"the gateway failed: {type(exc).__name__}: {exc}; this is a bug in Forge, "
                                         "please report it with the request", status=500, type="server_error").body(),
                            status_code=500)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(GatewayError(f"no route {request.method} {request.url.path}; the gateway serves "
                                         "/v1/models and /v1/chat/completions", status=404).body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(GatewayError(f"{request.method} is not allowed on {request.url.path}", status=405).body(),
                            status_code=405)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(config.model_name, created)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        if name != config.model_name:
            raise GatewayError(f"The model '{name}' does not exist; this gateway serves '{config.model_name}'",
                               status=404, param="model", code="model_not_found")
        return _model_card(name, created)

    @app.get("/forge/health")
    async def health() -> dict:
        return {"status": "ok", "policy_version": policy_version(), "sessions": len(store), **vars(engine.stats)}

    @app.get("/forge/sessions/{session_id}")
    async def get_session(session_id: str) -> dict:
        return _session(store, session_id).as_json()

    @app.delete("/forge/sessions/{session_id}")
    async def drop_session(session_id: str) -> dict:
        if store.pop(session_id) is None:
            raise GatewayError(f"no session '{session_id}'", status=404, param="session")
        return {"id": session_id, "deleted": True}

    @app.post("/forge/sessions/{session_id}/reward")
    async def reward(session_id: str, request: Request) -> dict:
        body = await _json(request)
        value = finite_number(body.get("reward")) if isinstance(body, dict) else None
        if value is None:
            raise GatewayError(f"the body must be {{\"reward\": <finite number>}}, got {preview(body)}", param="reward")
        try:
            session = store.close(session_id, value)
        except KeyError:
            raise GatewayError(f"no session '{session_id}': a session exists once a chat call named it "
                               f"(the {SESSION_HEADER} header or the 'user' field)", status=404, param="session") from None
        except SessionError as exc:
            raise GatewayError(str(exc), status=409, param="session") from None
        return {"id": session.id, "reward": session.reward, "calls": len(session.calls)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        # From the first byte read to the submit, the engine counts this request as arriving, so
        # a call it is gathering waits for it (forge.middleware.gateway.engine).
        with engine.arriving():
            req = parse_chat_request(await _json(request), served=config.model_name)
            session_id = request.headers.get(SESSION_HEADER) or req.user
            try:
                session = store.open(session_id) if session_id else None
            except SessionError as exc:
                raise GatewayError(str(exc), status=409, param="session") from None
            try:
                encoded = template.encode(req.messages, req.tools, session.produced if session else None)
            except ChatFormatError as exc:
                raise GatewayError(str(exc), param="messages") from None
            prompt = encoded.token_ids
            room = config.max_context_tokens - len(prompt)
            if room < 1:
                raise GatewayError(f"the prompt has {len(prompt)} tokens; this gateway's context holds "
                                   f"{config.max_context_tokens} (prompt + completion): shorten the messages",
                                   param="messages", code="context_length_exceeded")
            budget = min(req.max_tokens or config.default_max_tokens, room)
            temperature, top_p = req.temperature, req.top_p
            if sampling is not None:
                forced = sampling()
                temperature, top_p, budget = forced.temperature, forced.top_p, min(budget, forced.max_new_tokens)
            params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=budget,
                                    stop_token_ids=() if req.ignore_eos else stops, top_logprobs=req.top_logprobs if req.logprobs else 0)
            try:
                future = engine.submit(prompt, params, n=req.n, seed=req.seed)
            except Exception as exc:
                raise GatewayError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                   type="server_error") from None
        try:
            done = await asyncio.wrap_future(future)
        except Exception as exc:
            raise GatewayError(f"generation failed: {type(exc).__name__}: {exc}", status=500, type="server_error") from None
        cuts = [_apply_stop(c, req.stop, tokenizer) for c in done]
        choices = [_choice(i, c, cut, req, template, tokenizer, session, store, prompt, encoded.rerendered)
                   for i, (c, cut) in enumerate(zip(done, cuts))]
        # Usage counts what was recorded: a stop string's cut drops what came after it.
        sampled = sum(len(ids) for ids, *_ in cuts)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": sampled, "total_tokens": len(prompt) + sampled}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name,
                "system_fingerprint": f"forge-v{done[0].policy_version}"}
        if req.stream:
            return StreamingResponse(_chunks(head, choices, usage, req.include_usage), media_type="text/event-stream")
        # Plain JSON types already: rendered as they are, without FastAPI's per-value encoder.
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})

    return app


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise GatewayError(f"could not parse the JSON body of your request ({str(exc)[:120]}); "
                           "send a JSON object with Content-Type: application/json") from None


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "forge"}


def _session(store: SessionStore, session_id: str) -> Session:
    try:
        return store.get(session_id)
    except KeyError:
        raise GatewayError(f"no session '{session_id}'; sessions are created by chat calls with the "
                           f"{SESSION_HEADER} header (or the 'user' field)", status=404, param="session") from None


def _choice(index: int, completion: Completion, cut: tuple[list[int], list[float], str, list[int]],
            req: ChatRequest, template: ChatTemplate, tokenizer: Tokenizer, session: Session | None,
            store: SessionStore, prompt: list[int], rerendered: int) -> dict:
    ids, logprobs, reason, shown = cut
    message, finish = template.parse(shown, reason, f"call_{uuid.uuid4().hex[:16]}")
    if req.tool_choice == "none" and message.get("tool_calls"):
        # The policy called a tool it was told not to: the call goes back as text.
        message = {"role": "assistant", "content": visible_text(shown, tokenizer)}
        finish = "stop" if reason == "stop" else reason
    if session is not None:
        session.produced.add(ids, message)
        # The sampler's reason ('stop' or 'length'), as a Turn keeps it; the client gets OpenAI's.
        store.record(session, CallRecord(list(prompt), ids, logprobs, completion.policy_version, reason,
                                         rerendered=rerendered))
    choice = {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
    if req.logprobs:
        tops = completion.extra.get("top_logprobs")
        choice["logprobs"] = {"content": [
            {**_token(t, lp, tokenizer), "top_logprobs": [_token(i, v, tokenizer) for i, v in tops[j]] if tops else []}
            for j, (t, lp) in enumerate(zip(ids, logprobs))]}
    return choice


def _apply_stop(completion: Completion, stops: list[str],
                tokenizer: Tokenizer) -> tuple[list[int], list[float], str, list[int]]:
    """Cut at the first stop string: (the ids through the token that completed it (what the
    policy saw, recorded), their logprobs, finish reason 'stop', the ids of the text before the
    string: what the client's message is parsed from). Without a stop string both are all ids."""
    ids, logprobs, reason = list(completion.token_ids), list(completion.logprobs), completion.finish_reason
    # Most completions hold no stop string: one decode says so, before the token-by-token search.
    if not stops or not any(s in tokenizer.decode(ids) for s in stops):
        return ids, logprobs, reason, ids
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return ids[:k], logprobs[:k], "stop", tokenizer.encode(text[: min(hits)])
    return ids, logprobs, reason, ids


def _token(token_id: int, logprob: float, tokenizer: Tokenizer) -> dict:
    text = tokenizer.decode([token_id])
    raw = bytes([token_id]) if 0 <= token_id < 256 else text.encode("utf-8")
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def _chunks(head: dict, choices: list[dict], usage: dict, include_usage: bool):
    def event(choice_deltas: list[dict], usage_value: Any = None) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": choice_deltas}
        if include_usage:
            body["usage"] = usage_value
        return f"data: {json.dumps(body)}\n\n"

    for c in choices:
        m, i = c["message"], c["index"]
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        if m.get("reasoning_content"):
            yield event([{"index": i, "delta": {"reasoning_content": m["reasoning_content"]}, "logprobs": None,
                          "finish_reason": None}])
        if m.get("content"):
            yield event([{"index": i, "delta": {"content": m["content"]}, "logprobs": c["logprobs"], "finish_reason": None}])
        for j, call in enumerate(m.get("tool_calls") or []):
            yield event([{"index": i, "delta": {"tool_calls": [{"index": j, **call}]}, "logprobs": None,
                          "finish_reason": None}])
        yield event([{"index": i, "delta": {}, "logprobs": None if m.get("content") else c["logprobs"],
                      "finish_reason": c["finish_reason"]}])
    if include_usage:
        yield event([], usage)
    yield "data: [DONE]\n\n"
