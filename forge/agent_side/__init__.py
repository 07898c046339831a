"""Tool-using Gymnasium environments, the turn protocol, and rollout workers.

A user's environment subclasses `ToolEnv` and marks its tools with `@tool` (docs/envs.md).
The rest of the package: `protocol` parses turns, `episode` runs the token-exact agent loop,
`rollout` runs groups of episodes with retries, `rollout_actor` puts that in Ray actors,
`registry` lists the environments registered with Gymnasium under `forge/`.
"""

from forge.agent_side.env import ToolEnv
from forge.agent_side.tools import ToolSpec, tool

__all__ = ["ToolEnv", "ToolSpec", "tool"]
