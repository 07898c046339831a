"""Typed configuration: YAML recipes loaded strictly into one dataclass per component.

A recipe is a YAML file whose sections fill the dataclasses of `RecipeConfig`; `a.b.c=value`
overrides from the command line are parsed to the type of the field they name. Loading is
strict: an unknown key, a wrong type, a missing file or a bad `module:Class` reference raises a
`ConfigError` whose one-line message names the key, the file and the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from forge.agent_side.config import AgentConfig, EnvConfig, EnvLoadError, RolloutConfig, load_env_class
from forge.middleware.pool import PoolConfig
from forge.monitoring import WandbConfig
from forge.policy.config import ModelConfig
from forge.trainer.config import AlgorithmConfig, EvalConfig, TrainerConfig, WarmStartConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that cannot be loaded; the message is one line and names the fix."""

    def __init__(self, message: str) -> None:
        # Keys and values quoted in a message come from the user's file: keep it one printable line.
        super().__init__(_one_line(message))


class ClassRef(str):
    """A `module.path:ClassName` reference to a user class, checked when the recipe loads."""


@dataclass
class RunConfig:
    """Where a run's files go and how it is seeded."""

    name: str = "forge"
    """Run name; the run folder is `<output_dir>/<name>-<timestamp>/`."""
    output_dir: str = "runs"
    """Folder that holds the run folders."""
    seed: int = 0
    """Seed for every random generator of the run."""


@dataclass
class RayConfig:
    """The Ray cluster the run uses."""

    address: str | None = None
    """None starts a local cluster; 'auto' or 'ray://host:port' joins an existing one."""
    num_cpus: int | None = None
    """CPUs of the local cluster; None lets Ray count them."""


@dataclass
class LoopConfig:
    """Length and bookkeeping of the RL loop."""

    steps: int = 20
    """RL optimizer steps."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many RL steps (and after the last)."""
    table_every: int = 10
    """Log a W&B table of sample trajectories every this many steps."""
    keep_rollouts: bool = True
    """Keep every step's groups as Parquet under the run folder's rollouts/ (read by `forge inspect`)."""
    rollout_schedule: Literal["async", "fixed_lag"] = "async"
    """How rollouts overlap training. 'async': workers sample with the newest weights and each step
    trains on the groups that finished first (windowed FIFO, `pool.*`): the most throughput, but
    the batches depend on timing. 'fixed_lag': step k+1 trains the tasks of batch k, sampled with
    the weights of step k - pool.max_staleness, whatever the timing: a run repeats exactly on one
    machine (docs/quickstart.md). pool.window and pool.capacity are unused then."""


@dataclass
class RecipeConfig:
    """A whole recipe: one section per component."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run folder and seed."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment (with `agent`, only warm-start's demonstrations come from it)."""
    agent: AgentConfig = field(default_factory=AgentConfig)
    """A black-box agent program, rolled out through the gateway in place of env."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout workers."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Optimizer, DeepSpeed and batching."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The RL objective."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """The data pool between rollouts and training."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    """Supervised warm-start on oracle demonstrations."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    train: LoopConfig = field(default_factory=LoopConfig)
    """Length of the RL loop and its bookkeeping."""


def init_seed(cfg: RecipeConfig) -> int:
    """The seed of the model's initial weights: trainer.init_seed, else run.seed. `forge train`
    and `forge.replay` both start from it, so a replay starts from the run's weights."""
    return cfg.run.seed if cfg.trainer.init_seed is None else cfg.trainer.init_seed


def scoring_temperature(cfg: RecipeConfig) -> float:
    """The temperature the trainer scores RL tokens at: algorithm.temperature, else the rollouts'
    sampling temperature (1 for greedy rollouts). `forge train` and `forge.replay` both use it."""
    if cfg.algorithm.temperature is not None:
        return cfg.algorithm.temperature
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


def trainer_algorithm(cfg: RecipeConfig) -> AlgorithmConfig:
    """cfg.algorithm with its temperature resolved (scoring_temperature)."""
    return dataclasses.replace(cfg.algorithm, temperature=scoring_temperature(cfg))


def load_recipe(path: str | Path, overrides: Sequence[str] = (), cls: type[T] = RecipeConfig) -> T:
    """Load a YAML recipe into `cls`, then apply `a.b.c=value` overrides."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        hint = _nearest_file(path)
        raise ConfigError(f"{source}: recipe file not found" + (f"; did you mean '{hint}'?" if hint else ""))
    data = _load_yaml(path, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of sections, got {type(data).__name__}")
    _check_shape(data, source)
    for item in overrides:
        apply_override(data, item, cls)
    cfg = from_dict(cls, data, source=source)
    if isinstance(cfg, RecipeConfig):
        # The env class is checked here so that a typo fails before any actor starts.
        try:
            load_env_class(cfg.env.cls)
        except EnvLoadError as exc:
            raise ConfigError(f"{source}: env.cls: {exc}") from None
        if cfg.agent.enabled:
            from forge.agent_side.agent import load_agent

            try:
                load_agent(cfg.agent)
            except EnvLoadError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            if cfg.agent.tool_style not in ("full", "brief"):
                raise ConfigError(f"{source}: agent.tool_style must be 'full' or 'brief', got '{cfg.agent.tool_style}'")
    return cfg


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or 'recipe'}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{dotted}'{_suggest(str(key), fields, prefix)}")
        kwargs[key] = _convert(hints[key], value, source=source, key=dotted)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {prefix or 'recipe'}: {exc}") from None
    except ArithmeticError as exc:
        # A section's own check divided by a zero (or overflowed on a huge number) it was given.
        raise ConfigError(f"{source}: {prefix or 'recipe'}: its values fail their own check ({exc}); "
                          "look for a size or count set to 0 or to a huge number") from None


def apply_override(data: dict, item: str, cls: type) -> None:
    """Set `a.b.c=value` in the raw recipe mapping, parsing value to the field's type."""
    if "=" not in item:
        raise ConfigError(f"command line: override '{item}' must look like a.b.c=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    target_cls: Any = cls
    node = data
    for depth, name in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not (isinstance(target_cls, type) and dataclasses.is_dataclass(target_cls)):
            raise ConfigError(f"command line: '{prefix}' is a value, not a section; cannot set '{dotted}'")
        fields = {f.name: f for f in dataclasses.fields(target_cls)}
        if name not in fields:
            raise ConfigError(f"command line: unknown key '{'.'.join(parts[:depth + 1])}'{_suggest(name, fields, prefix)}")
        field_type = typing.get_type_hints(target_cls)[name]
        if depth == len(parts) - 1:
            value = _parse_text(field_type, raw, key=dotted)
            # Check it here so that an error blames the command line, not the recipe file.
            _convert(field_type, value, source="command line", key=dotted)
            node[name] = value
            return
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: '{dotted}': the recipe sets '{name}' to a value, not a section")
        node, target_cls = child, _strip_optional(field_type)


def to_dict(cfg: Any) -> dict:
    """Plain mapping of a config dataclass, as written to a run's config.yaml."""
    return _plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolve_ref(ref: str, *, key: str = "cls", source: str = "<config>") -> Any:
    """Import the object a `module.path:Name` reference names, with a one-line error if it can't."""
    if ref.count(":") != 1:
        raise ConfigError(f"{source}: {key}: '{ref}' is not a class reference; write it as module.path:ClassName")
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise ConfigError(
            f"{source}: {key}: cannot import module '{module_name}' (no module named '{missing}'); "
            "check the spelling and that its package is installed or on PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module itself failed at import time
        raise ConfigError(f"{source}: {key}: importing '{module_name}' failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=1)
        hint = f"; did you mean '{module_name}:{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: {key}: module '{module_name}' has no attribute '{attr}'{hint}")
    return getattr(module, attr)


def _convert(tp: Any, value: Any, *, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, source=source, key=key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {allowed}{hint}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_tp = args[0]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{source}: {key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, source=source, key=f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        else:
            item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {_describe(value)}")
        val_tp = args[1] if args else Any
        return {k: _convert(val_tp, v, source=source, key=f"{key}.{k}") for k, v in value.items()}
    if tp is ClassRef:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a module.path:ClassName reference, got {_describe(value)}")
        resolve_ref(value, key=key, source=source)
        return ClassRef(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected an integer, got {_describe(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(f"{source}: {key}: {_describe(value)} is too large for a number") from None
        # YAML 1.1 reads '1e-3' as a string; accept what is plainly a number.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{source}: {key}: expected a number, got {_describe(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {key}: {_describe(value)} is not a finite number; write one such as 0.001")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key}: expected a string, got {_describe(value)} (quote it in YAML)")
    raise ConfigError(f"{source}: {key}: fields of type {tp!r} cannot be loaded from a recipe")


def _parse_text(tp: Any, raw: str, *, key: str) -> Any:
    """Parse an override's text to the field type; lists and mappings are written in YAML."""
    text = raw.strip()
    base = _strip_optional(tp)
    if text.lower() in ("null", "none", "~") and base is not tp:
        return None
    if base is str or base is ClassRef or typing.get_origin(base) is Literal:
        return text
    if base is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"command line: {key}: expected true or false, got '{text}'")
    if base is int:
        try:
            return int(text)
        except ValueError:
            if text.lstrip("+-").isdigit():
                raise ConfigError(f"command line: {key}: {len(text)} digits is too long an integer; write a smaller one") from None
            raise ConfigError(f"command line: {key}: expected an integer, got '{text}'") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"command line: {key}: expected a number, got '{text}'") from None
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError):
        raise ConfigError(f"command line: {key}: '{text}' is not valid YAML") from None
    _check_shape(value, f"command line: {key}")
    return value


_MAX_BYTES = 256 * 1024
_MAX_DEPTH = 32
_MAX_VALUES = 100_000


def _load_yaml(path: Path, source: str) -> Any:
    """The YAML document of a recipe file ({} if empty); ConfigError with one line if unreadable."""
    try:
        # PyYAML reads about 100 KB/s: a bound on the size is a bound on the time.
        if path.stat().st_size > _MAX_BYTES:
            raise ConfigError(f"{source}: {path.stat().st_size} bytes is no recipe (a recipe is a few KB of YAML, "
                              f"at most {_MAX_BYTES}); check that this is the right file")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save the recipe as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({exc.strerror or exc}); check that it is a readable file") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        if mark is None and getattr(exc, "position", None) is not None:
            where = f" at character {exc.position}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read; a recipe's sections are a few levels deep") from None
    except ValueError as exc:
        # PyYAML builds a tagged or plain number with int()/float(); their errors are plain ValueErrors.
        if "digits" in str(exc):
            raise ConfigError(f"{source}: a number has more than 4300 digits; write a smaller one") from None
        raise ConfigError(f"{source}: a value cannot be read ({str(exc).splitlines()[0]}); "
                          "fix the value or its !!tag") from None


def _check_shape(data: Any, where: str) -> None:
    """Refuse YAML that no recipe needs and that would hang or crash the loader: a mapping or
    list that contains itself through an alias, nesting past _MAX_DEPTH, or aliases that expand
    past _MAX_VALUES values (a 'billion laughs' document)."""
    seen: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()

    def walk(node: Any, depth: int) -> tuple[int, int]:
        """(values in node once expanded, its nesting height)."""
        if not isinstance(node, (dict, list)):
            return 1, 0
        if id(node) in on_path:
            raise ConfigError(f"{where}: a YAML alias refers to a mapping or list that holds it; "
                              "a recipe cannot contain itself")
        if id(node) not in seen:
            on_path.add(id(node))
            size, height = 1, 0
            for child in node.values() if isinstance(node, dict) else node:
                child_size, child_height = walk(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
            on_path.discard(id(node))
            seen[id(node)] = (size, height)
        size, height = seen[id(node)]
        if depth + height > _MAX_DEPTH:
            raise ConfigError(f"{where}: nested more than {_MAX_DEPTH} levels deep; a recipe's sections are a few levels deep")
        if size > _MAX_VALUES:
            raise ConfigError(f"{where}: expands to {size} values (YAML aliases repeat what they name); "
                              f"a recipe holds at most {_MAX_VALUES}")
        return size, height

    walk(data, 0)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _suggest(name: str, fields: Mapping[str, Any], prefix: str) -> str:
    close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.5)
    if close:
        full = f"{prefix}.{close[0]}" if prefix else close[0]
        return f"; did you mean '{full}'?"
    where = f"'{prefix}'" if prefix else "a recipe"
    return f"; valid keys of {where}: {', '.join(fields)}"


def _nearest_file(path: Path) -> str | None:
    parent = path.parent if path.parent.is_dir() else None
    if parent is None:
        return None
    names = [p.name for p in parent.iterdir() if p.suffix in (".yaml", ".yml")]
    close = difflib.get_close_matches(path.name, names, n=1)
    return str(parent / close[0]) if close else None


_LONG_WORD = re.compile(r"\S{201,}")


def _one_line(text: str) -> str:
    """`text` as one printable line: control characters, line separators and lone surrogates
    escaped, and words of over 200 characters shortened."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)
    return _LONG_WORD.sub(lambda m: f"{m[0][:120]}...({len(m[0])} characters)...{m[0][-40:]}", text)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, ClassRef):
        return str(value)
    return value
