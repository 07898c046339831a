"""Tool-using Gymnasium environments, the turn protocol, and rollout workers."""
