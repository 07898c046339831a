"""Config of the agent side: which environment (`EnvConfig`) or black-box agent (`AgentConfig`),
how rollouts run (`RolloutConfig`).

The lead's recipe loader composes these into the recipe; `load_env_class` resolves
`env.cls: my_pkg.my_env:MyEnv` with a one-line error that names the fix. It lives here rather
than in `forge/config.py` because the agent side must not import the layer above it.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any

from forge.agent_side.context import ContextConfig
from forge.agent_side.env import ToolEnv
from forge.agent_side.faults import FaultConfig, faulty_class
from forge.policy.sampling import SamplingParams


class EnvLoadError(ValueError):
    """An `env.cls` reference that does not name a `ToolEnv` subclass; the message says why."""


@dataclass
class EnvConfig:
    """The environment rollouts run in."""

    cls: str = "envs.calculator:CalculatorEnv"
    """The env class as 'module.path:ClassName'; it must subclass forge.agent_side.ToolEnv."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the env's constructor."""
    difficulty: int = 0
    """Task difficulty level passed to the env (0 is the easiest)."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Faults injected into the env at set rates, to test that runs survive them (docs/reliability.md); off by default."""

    def make(self) -> ToolEnv:
        """A fresh env instance; with any `faults` rate above 0, of the env class with faults injected."""
        cls = load_env_class(self.cls)
        if self.faults.enabled:
            cls = faulty_class(cls, self.faults)
        return cls(difficulty=self.difficulty, **self.kwargs)


@dataclass
class AgentConfig:
    """A black-box agent program, trained through the gateway in place of `env` (docs/agents.md)."""

    cls: str = ""
    """The agent as 'module.path:run', an `async def run(task: dict, client: openai.AsyncOpenAI) -> float`; empty: use env."""
    tasks: str = ""
    """The tasks as 'module.path:tasks', a `tasks(seed: int) -> dict` giving the task of a seed."""
    tool_style: str = "full"
    """How the gateway shows a request's tools to the policy: 'full' (JSON schemas) or 'brief' (signatures)."""
    model_name: str = "forge-policy"
    """The `model` the agent's requests name."""

    @property
    def enabled(self) -> bool:
        return bool(self.cls)


@dataclass
class RolloutConfig:
    """How rollout workers run episodes."""

    group_size: int = 8
    """Samples per task (G); group-relative advantages compare them."""
    num_workers: int = 1
    """Rollout worker actors."""
    actor_num_cpus: float = 1.0
    """CPUs Ray reserves for each rollout actor."""
    actor_num_gpus: float = 0.0
    """GPUs Ray reserves for each rollout actor (for generation on a GPU)."""
    actor_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each rollout actor needs, e.g. {rollout_node: 1} to pin them to nodes started with that resource."""
    concurrency: int = 32
    """Episodes a worker runs at once; their turns go to the generator in one batch."""
    max_retries: int = 2
    """Times a group with a failed member is rerun with fresh envs before it is dropped."""
    turn_timeout_s: float = 60.0
    """Wall-clock limit of one env call (reset or step); past it the trajectory fails."""
    episode_timeout_s: float = 600.0
    """Wall-clock limit of one episode; past it the trajectory fails."""
    temperature: float = 1.0
    """Sampling temperature of the policy; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    max_new_tokens: int = 512
    """Most tokens the policy samples in one turn."""
    backpressure_wait_s: float = 0.5
    """Seconds a worker with nothing running waits before asking a full data pool again."""
    max_context_tokens: int = 32768
    """An episode whose context would pass this ends truncated (status ok, no more turns)."""
    prefix_cache_tokens: int = 0
    """Tokens of recent conversations whose keys each generator keeps, so a turn prefills only what is new; 0: off."""
    routing_replay: bool = False
    """Record every token's MoE experts and MSA blocks where it is sampled, and have the trainer
    impose them (forge.policy.choices; docs/policy.md, "Routing replay"): the trainer then scores
    what the sampler computed, merged or not. About 330 bytes a token for msa_100m."""
    context: ContextConfig = field(default_factory=ContextConfig)
    """Context management: the compact action and the env-side context policies (docs/context.md); off by default."""

    def __post_init__(self) -> None:
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"rollout.prefix_cache_tokens must be >= 0 (0 turns the cache off), "
                             f"got {self.prefix_cache_tokens}")

    def warnings(self) -> list[str]:
        """Settings that run but lose something, each with its fix (the driver logs them)."""
        out = []
        if self.routing_replay and not self.prefix_cache_tokens:
            out.append("rollout.routing_replay is on without rollout.prefix_cache_tokens: each turn prefills the "
                       "conversation again and records its choices anew, so earlier turns' tokens carry choices "
                       "they were not sampled under, and a group's samples may record their prompt differently "
                       "(the trainer then merges less); set rollout.prefix_cache_tokens (e.g. 1048576)")
        return out

    def sampling_params(self, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        """The generator's settings for one turn, stopping at the given ids."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids,
        )


def fault_counts(env_cfg: EnvConfig) -> dict[str, int]:
    """Faults injected so far in this process into envs of `env_cfg` (empty without env.faults)."""
    if not env_cfg.faults.enabled:
        return {}
    return dict(faulty_class(load_env_class(env_cfg.cls), env_cfg.faults).injected_total)


def _resolve(ref: str, key: str, example: str) -> Any:
    """The object a 'module.path:name' reference names (None if the module lacks it, after
    raising with a suggestion); EnvLoadError (one line) naming `key` if it cannot be imported."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise EnvLoadError(f"{key} '{ref}' is not a reference; write it as {example}")
    module_name, name = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise EnvLoadError(f"{key} '{ref}': no module named '{exc.name or module_name}'; "
                           "check the spelling and that the package is installed or on PYTHONPATH") from None
    except Exception as exc:
        raise EnvLoadError(f"{key} '{ref}': importing '{module_name}' raised {type(exc).__name__}: {exc}") from None
    obj = getattr(module, name, None)
    if obj is None:
        close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
        hint = f"; did you mean '{module_name}:{close[0]}'?" if close else ""
        raise EnvLoadError(f"{key} '{ref}': module '{module_name}' has no '{name}'{hint}")
    return obj


def resolve_callable(ref: str, key: str) -> Any:
    """The callable a 'module.path:name' reference names; EnvLoadError (one line) if not."""
    obj = _resolve(ref, key, "module.path:name, e.g. my_pkg.my_agent:run")
    if not callable(obj):
        raise EnvLoadError(f"{key} '{ref}' is {type(obj).__name__} {obj!r}, not a function")
    return obj


def load_env_class(ref: str) -> type[ToolEnv]:
    """The `ToolEnv` subclass named by 'module.path:ClassName'; EnvLoadError (one line) if not."""
    obj = _resolve(ref, "env class", "module.path:ClassName, e.g. envs.calculator:CalculatorEnv")
    if not (isinstance(obj, type) and issubclass(obj, ToolEnv)):
        raise EnvLoadError(f"env class '{ref}' is {type(obj).__name__} {obj!r}, not a ToolEnv; subclass forge.agent_side.ToolEnv")
    return obj
