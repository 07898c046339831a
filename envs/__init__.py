"""Built-in environments, each a Python class a user could have written.

Importing this package registers them with Gymnasium under the `forge/` namespace, e.g.
`gymnasium.make("forge/Calculator-v0")`; `difficulty=` passes through `make`.
"""

from __future__ import annotations

import gymnasium

#: Gymnasium id -> "module:Class" of every built-in environment.
BUILTIN_ENVS: dict[str, str] = {
    "forge/Calculator-v0": "envs.calculator:CalculatorEnv",
    "forge/Needle-v0": "envs.needle:NeedleEnv",
    "forge/Maze-v0": "envs.maze:MazeEnv",
    "forge/Python-v0": "envs.python_env:PythonEnv",
    "forge/Reverse-v0": "envs.reverse:ReverseEnv",
    "forge/Relay-v0": "envs.relay:RelayEnv",
}

for _env_id, _entry in BUILTIN_ENVS.items():
    # Re-importing (tests, Ray workers) must not re-register: Gymnasium warns on overrides.
    if _env_id not in gymnasium.registry:
        gymnasium.register(id=_env_id, entry_point=_entry, disable_env_checker=False)
