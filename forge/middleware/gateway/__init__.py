"""The OpenAI-compatible gateway: black-box agents talk to the policy over HTTP, and every call's
exact tokens are recorded under a session (docs/agents.md).

`create_app` builds the FastAPI app over a `BatchingEngine` (the generator shared by all
sessions) and a `SessionStore`; `GatewayServer` serves it with uvicorn on 127.0.0.1. FastAPI and
uvicorn are imported by those modules only, so `sessions` and `engine` work without them.
"""
