"""Tool-using Gymnasium environments, the turn protocol, and rollout workers.

A user's environment subclasses `ToolEnv` and marks its tools with `@tool` (docs/envs.md).
The modules, in the order data flows through them:

- `tools`: `@tool`, JSON schemas from type hints and docstrings, argument checks.
- `protocol`: parse an assistant turn (think, tool calls or answer) without ever raising.
- `env`: `ToolEnv`, the contract on top of `gymnasium.Env`.
- `episode`: the token-exact agent loop for one episode.
- `rollout`: groups of episodes with retries and time limits, plain Python.
- `rollout_actor`: the same in Ray actors (the only module that imports ray).
- `config`: `EnvConfig`, `RolloutConfig`, `load_env_class`.
- `registry`, `checker`, `commands`: `forge env list` and `forge env check`.

Only `ToolEnv` and `tool` are imported here, so an env author's import stays light.
"""

from forge.agent_side.env import ToolEnv
from forge.agent_side.tools import ToolSpec, tool

__all__ = ["ToolEnv", "ToolSpec", "tool"]
