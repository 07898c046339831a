"""Forge: agent-native reinforcement learning for tool-using language models.

The packages import in one direction only (see docs/architecture.md):
kernels -> policy -> trainer; agent_side and trainer meet only in middleware types.
"""

__version__ = "0.1.0"
