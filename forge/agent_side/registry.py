"""The environments registered with Gymnasium under the `forge/` namespace.

Registration itself happens when the built-in `envs` package is imported; this module imports
it lazily, inside the function, so that importing `forge.agent_side` stays light and never
depends on `envs` (which sits above it and imports it).
"""

from __future__ import annotations

import importlib

import gymnasium

NAMESPACE = "forge"


def registered_envs() -> dict[str, str]:
    """Gymnasium id -> entry point ('module:Class') of every env under `forge/`, sorted by id."""
    try:
        importlib.import_module("envs")
    except ModuleNotFoundError as exc:
        # Only the built-in package's absence is tolerated; an import error inside it is a bug.
        if exc.name != "envs":
            raise
    out = {}
    for env_id, spec in gymnasium.registry.items():
        if spec.namespace == NAMESPACE:
            entry = spec.entry_point
            out[env_id] = entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"
    return dict(sorted(out.items()))


def resolve_target(target: str) -> str:
    """A 'module:Class' reference for a `forge/` id, a 'package:forge/Id' (as `gymnasium.make`
    takes it: the package is imported first, so its registrations count) or a reference itself."""
    package, sep, rest = target.partition(":")
    if sep and rest.startswith(NAMESPACE + "/"):
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as exc:
            raise KeyError(f"cannot import '{package}' (no module named '{exc.name}'); check it is installed or on PYTHONPATH") from None
        target = rest
    if target.startswith(NAMESPACE + "/"):
        envs = registered_envs()
        if target not in envs:
            raise KeyError(f"no environment '{target}' is registered; `forge env list` shows them")
        return envs[target]
    return target
