"""Hostile input, fuzzed (issue 17): the recipe loader, the turn protocol's parser, `forge inspect`
on corrupt runs, and the gateway's HTTP endpoints.

Every case comes from a seeded `random.Random` or a fixed list, so a failure repeats exactly. Each
fuzz loop collects the cases that broke its rule and asserts the list is empty at the end, so one
run shows every kind of failure at once (first few of each kind). The rules:

- `forge config` / `forge inspect`: exit 0, or exit 2 with exactly one line `forge: error: ...`
  on stderr that names the key or file; never a traceback. `load_recipe` raises only ConfigError.
- `parse_turn` and `ChatTemplate.parse` never raise, on any text or ids; what `parse` returns is
  strict JSON (no NaN), encodable as UTF-8, as the gateway sends it.
- The gateway answers everything with JSON: a 200 for a valid request, else a 4xx in OpenAI's
  error format `{"error": {"message", "type", "param", "code"}}` whose message is one line; never
  a 500; and it still serves a valid request afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import string
import time
import typing
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from forge.cli import main
from forge.config import ConfigError, RecipeConfig, dump_yaml, load_recipe
from forge.middleware.arrow import TRAJECTORY_SCHEMA, to_record_batch, write_parquet
from forge.middleware.gateway.app import GatewayConfig, create_app
from forge.middleware.gateway.engine import BatchingEngine
from forge.middleware.gateway.server import GatewayServer
from forge.middleware.gateway.sessions import SessionStore
from forge.middleware.types import Group, Trajectory, Turn
from forge.policy.chat import ChatFormatError, ChatTemplate
from forge.policy.protocol import ParsedTurn, ProtocolError, ToolCall, parse_turn
from forge.policy.sampling import Completion, SamplingParams
from forge.policy.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TOK = ByteTokenizer()
MODEL = "forge-policy"


class Failures:
    """Broken rules, grouped by kind; `check()` fails the test with the first cases of each kind."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = defaultdict(list)
        self.cases = 0

    def add(self, kind: str, case: str) -> None:
        self.by_kind[kind].append(case[:300])

    def check(self) -> None:
        report = [f"{len(cases)} x {kind}: " + " | ".join(cases[:3]) for kind, cases in self.by_kind.items()]
        assert not report, f"{sum(map(len, self.by_kind.values()))} of {self.cases} cases broke a rule:\n" + "\n".join(report)


def one_line_error(rc: int, err: str, names: Sequence[str]) -> str | None:
    """What is wrong with an exit status and stderr of `forge` (None if nothing): exit 0, or exit 2
    with one line `forge: error: ...` naming one of `names`."""
    if rc == 0:
        return None
    if rc != 2:
        return f"exit status {rc}"
    if "Traceback" in err:
        return "a traceback"
    if not err.endswith("\n") or len(err.splitlines()) != 1 or err.count("\n") != 1:
        return f"{len(err.splitlines())} lines on stderr"
    if not err.startswith("forge: error: "):
        return "no 'forge: error:' prefix"
    if len(err) > 2000:
        return f"a {len(err)}-character line"
    if names and not any(n in err for n in names):
        return "the line names neither the key nor the file"
    return None


def run_forge(argv: list[str], capsys) -> tuple[int, str] | str:
    """(exit status, stderr) of `forge argv` run in this process, or what it raised."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except BaseException as exc:  # noqa: BLE001 - anything that escapes `main` is the finding
        capsys.readouterr()
        return f"raised {type(exc).__name__}: {str(exc)[:120]!r}"
    return rc, capsys.readouterr().err



HUGE_INT = 10**400
SCALARS: list[Any] = [
    0, 1, -1, 2**31, 2**63, HUGE_INT, -HUGE_INT, 1e308, float("inf"), float("-inf"), float("nan"), 0.5,
    True, False, None, "", "x", "1e400", "nan", ".inf", "-1", "module:Class", "envs.calculator:CalculatorEnv",
    "no_such_module_fz:Thing", "a\nb", "\x00", "\x1b[31mred", "\u2028", "\ud800", "é" * 50, "x" * 5000,
    "async", "fixed_lag", "grpo", "constant", "cosine", "offline", "full", "brief",
]


def random_text(rng: random.Random, n: int) -> str:
    alphabet = string.printable + "éあ😀\u2028\x00\x1b\ud800:.=[]{}&*!|>'\""
    return "".join(rng.choice(alphabet) for _ in range(n))


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A random YAML-able value: a scalar of SCALARS or random text, or a list or mapping of junk."""
    r = rng.random()
    if depth >= 4 or r < 0.6:
        return rng.choice(SCALARS) if rng.random() < 0.8 else random_text(rng, rng.randint(0, 30))
    if r < 0.8:
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [rng.choice(["a", "seed", "cls", "kwargs", "steps", 1, None, True, random_text(rng, 5)])
            for _ in range(rng.randint(0, 4))]
    return {k: junk(rng, depth + 1) for k in keys}


def recipe_keys() -> list[str]:
    """Every dotted key of RecipeConfig (sections too), and every key the quickstart recipe sets."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{prefix}{f.name}"
            keys.append(dotted)
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, dotted + ".")

    walk(RecipeConfig, "")
    return keys


def quickstart_data() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def set_key(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


HOSTILE_TEXTS: list[str] = [
    "",
    # PyYAML's scanner is quadratic in flow nesting: 400 levels take 0.5 s, 5000 take 8 s.
    "[" * 400 + "]" * 400,
    "a: " + "{b: " * 3000 + "1" + "}" * 3000,
    "a:\n" + "".join(" " * i + "- \n" for i in range(1, 300)),
    "env:\n  kwargs: " + "[" * 300 + "]" * 300,
    "env:\n  kwargs:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(200)) + "  " * 202 + "x: 1\n",
    # Billion laughs: aliases that expand to 10**8 values.
    "env:\n  kwargs:\n    a: &a [1,1,1,1,1,1,1,1,1,1]\n"
    + "".join(f"    {c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh")),
    "env:\n  kwargs: &a {x: *a}\n",
    "env:\n  kwargs: {x: &a [*a]}\n",
    "trainer:\n  betas: &a [*a, *a]\n",
    "rollout:\n  actor_resources: &a {x: *a}\n",
    "run: &a {seed: *a}\n",
    "train:\n  steps: " + "9" * 5000 + "\n",
    "run:\n  seed: 1" + "0" * 400 + "\n",
    "trainer:\n  lr: 1e400\n",
    "trainer:\n  lr: 1.0e+400\n",
    "trainer:\n  lr: .nan\n",
    "trainer:\n  lr: -.inf\n",
    "trainer:\n  lr: " + "9" * 400 + "\n",
    "rollout:\n  temperature: " + "9" * 400 + "\n",
    "model:\n  num_kv_heads: 0\n",
    "model:\n  num_heads: 0\n  num_kv_heads: 0\n",
    "model:\n  head_dim: 0\n  rotary_dim: 0\n",
    "model:\n  hidden_size: " + "9" * 400 + "\n",
    "trainer:\n  num_ranks: 0\n",
    "pool:\n  window: " + "9" * 400 + "\n",
    "\x00\x01\x02binary",
    "\ufeffrun: {seed: 1}\n",
    "a: b: c\n",
    "run:\n\tseed: 1\n",
    "--- 1\n--- 2\n",
    "!!python/object/apply:os.system ['echo hi']\n",
    "run: !!binary aGVsbG8=\n",
    "run:\n  name: 2024-01-01\n",
    "run:\n  name: !!set {a, b}\n",
    "? [a, b]\n: 1\n",
    "{1: 2}\n",
    "run: {seed: 1, seed: 2}\n",
    "<<: {run: {seed: 1}}\n",
    "run:\n  <<: {seed: 3}\n",
    "'\n",
    "run:\n  name: " + "x" * 1_000_000 + "\n",
    '"ru\\nn": 1\n',
    '"\\e[31mrun": 1\n',
    '"\\ud800": 1\n',
    'run:\n  name: "\\ud800"\n',
    'env:\n  cls: "a\\nb:C"\n',
    'env:\n  cls: "envs.calculator:Calculator\\u2028Env"\n',
    "env:\n  cls: " + "m" * 5000 + ":C\n",
    "env:\n  cls: ..:..\n",
    "env:\n  cls: .envs:X\n",
    "env:\n  cls: 'envs.calculator:CalculatorEnv:x'\n",
    "agent:\n  cls: no_such_module_fz:run\n",
    "agent:\n  cls: envs.calculator:CalculatorEnv\n  tasks: envs.calculator:CalculatorEnv\n",
    "x" * 5000 + ": 1\n",
    "\n".join(f"k{i}: {i}" for i in range(2000)) + "\n",
    "env:\n  kwargs: {" + ", ".join(f"k{i}: {i}" for i in range(2000)) + "}\n",
    "run:\n  name: " + "x" * 200_000 + "\n",
    "env:\n  kwargs: [" + ", ".join(str(i) for i in range(100000)) + "]\n",
    "%YAML 9.9\n---\na: 1\n",
    "&a\n",
    "*a\n",
    "!<tag:yaml.org,2002:python/name:os.system> x\n",
    "a: !!float abc\n",
    "a: !!int 1.5\n",
    "train:\n  rollout_schedule: [async]\n",
    "train:\n  rollout_schedule: {a: 1}\n",
    "trainer:\n  betas: [0.9]\n",
    "trainer:\n  betas: [0.9, 0.9, 0.9]\n",
    "trainer:\n  betas: ['a', {}]\n",
    "trainer: []\n",
    "trainer: 3\n",
    "[1, 2]\n",
    "3\n",
    "'just a string'\n",
]

OVERRIDE_VALUES = [
    "1", "-1", "0", "1e400", "nan", "inf", "-inf", "9" * 5000, "1" + "0" * 400, "[" * 3000 + "]" * 3000,
    "&a [*a]", "&a {x: *a}", "{a: 1}", "[1, 2]", "true", "", "null", "x\ny", "\x00", "\ud800", "x" * 20000,
    "envs.calculator:CalculatorEnv", "no_such_module_fz:Thing", "'", "a: b: c", "!!python/name:os.system",
    "2024-01-01", ".nan", "0x10", "1_000", "+1", " 7 ",
]
JUNK_OVERRIDE_KEYS = [
    "a..b", "", "nokey", "run.seed.x", "run", "model", ".", "x" * 10000, "run.sed", "a\nb", "run.\x00",
    "trainer.betas.0", "env.kwargs.x", "env.kwargs", "rollout.actor_resources.gpu", "\ud800", "run .seed",
]


def random_override(rng: random.Random, keys: list[str]) -> str:
    r = rng.random()
    if r < 0.05:
        return random_text(rng, rng.randint(0, 20)).lstrip("-") or "x"
    key = rng.choice(JUNK_OVERRIDE_KEYS) if r < 0.3 else rng.choice(keys)
    value = rng.choice(OVERRIDE_VALUES) if rng.random() < 0.7 else random_text(rng, rng.randint(0, 20))
    # A leading '-' is argparse's (an unknown option), not the loader's.
    return (key + "=" + value).lstrip("-") or "x=1"


def recipe_cases(tmp: Path) -> list[tuple[Path, list[str]]]:
    """(recipe file, overrides) of every case: hostile texts, random documents, mutated quickstart
    recipes, random bytes, truncated and bit-flipped quickstart files."""
    rng = random.Random(1701)
    keys = recipe_keys()
    base = quickstart_data()
    source = QUICKSTART.read_bytes()
    docs: list[bytes] = [t.encode("utf-8", "surrogatepass") for t in HOSTILE_TEXTS]
    for _ in range(60):
        docs.append(yaml.safe_dump(junk(rng), allow_unicode=rng.random() < 0.5).encode("utf-8", "surrogatepass"))
    for _ in range(200):
        data = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(keys) if rng.random() < 0.9 else rng.choice(keys) + "." + random_text(rng, 4)
            set_key(data, key, junk(rng))
        text = yaml.safe_dump(data, allow_unicode=rng.random() < 0.5, sort_keys=rng.random() < 0.5)
        docs.append(text.encode("utf-8", "surrogatepass"))
    for _ in range(20):
        docs.append(rng.randbytes(rng.randint(1, 300)))
    for _ in range(20):
        docs.append(source[: rng.randrange(len(source))])
    for _ in range(20):
        flipped = bytearray(source)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        docs.append(bytes(flipped))
    cases = []
    for i, doc in enumerate(docs):
        path = tmp / f"recipe-{i:04d}.yaml"
        path.write_bytes(doc)
        overrides = [random_override(rng, keys) for _ in range(rng.choice([0, 0, 1, 2, 3]))]
        cases.append((path, overrides))
    # Overrides alone, on the good recipe.
    for _ in range(150):
        cases.append((QUICKSTART, [random_override(rng, keys) for _ in range(rng.randint(1, 3))]))
    return cases


def test_recipe_loader_fuzz(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    failures = Failures()
    for path, overrides in recipe_cases(tmp_path):
        failures.cases += 1
        case = f"{path.name} {overrides!r}"
        start = time.perf_counter()
        result = run_forge(["config", str(path), *overrides], capsys)
        if isinstance(result, str):
            failures.add(f"forge config {result.split(':')[0]}", f"{case}: {result}")
        else:
            rc, err = result
            names = [str(path), "command line"]
            problem = one_line_error(rc, err, names)
            if problem:
                failures.add(f"forge config: {problem}", f"{case}: {err[:200]!r}")
        try:
            load_recipe(path, overrides)
        except ConfigError:
            pass
        except BaseException as exc:  # noqa: BLE001
            failures.add(f"load_recipe raised {type(exc).__name__}", f"{case}: {str(exc)[:120]!r}")
        if time.perf_counter() - start > 5:
            failures.add("slow (> 5 s)", case)
    failures.check()



FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "<tool_result>",
    "</tool_result>", '<tool_result name="x">', "{", "}", "[", "]", '"name"', '"arguments"', ":", ",", '"',
    '"calc"', "NaN", "Infinity", "-Infinity", "1e400", "9" * 5000, "\\ud800", '"\\ud800"', "\\u0000", "null",
    "\ud800", "\x00", "\n", "😀", "<eos>", "<bos>", "<pad>", " ", "true", '{"name": "calc", "arguments": {}}',
    '{"name": "calc", "arguments": {"x": NaN}}', '{"name": "\\ud800", "arguments": {}}', '{"name": 5}',
    '{"name": "a", "arguments": []}', '{"name": "a", "arguments": {"\\udfff": 1}}',
]


def random_turn(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.1:
        return rng.randbytes(rng.randint(0, 200)).decode(rng.choice(["utf-8", "latin-1"]),
                                                         errors=rng.choice(["replace", "surrogateescape", "ignore"]))
    if r < 0.2:
        return random_text(rng, rng.randint(0, 200))
    return "".join(rng.choice(FRAGMENTS) if rng.random() < 0.8 else random_text(rng, 3)
                   for _ in range(rng.randint(0, 40)))


def hostile_turns() -> list[Any]:
    deep = 100_000
    return [
        "", None, 5, b"<answer>x</answer>", ["<answer>"],
        "<tool_call>" + "[" * deep + "]" * deep + "</tool_call>",
        "<tool_call>" + '{"a":' * deep + "1" + "}" * deep + "</tool_call>",
        '<tool_call>{"name": "x", "arguments": ' + "[" * 5000 + "]" * 5000 + "}</tool_call>",
        '<tool_call>{"name": "x", "arguments": {"a": ' + "[" * 900 + "]" * 900 + "}}</tool_call>",
        "<tool_call>" * 200_000,
        "<think>" * 200_000,
        "<answer>" * 100_000 + "</answer>",
        "<tool_call>{}</tool_call>" * 20_000,
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>' * 10_000,
        "<think>" + "x" * 2_000_000 + "</think><answer>y</answer>",
        '<tool_call>{"name": "a", "arguments": {"n": ' + "9" * 5000 + "}}</tool_call>",
        '<tool_call>{"name": "a", "arguments": {"n": 1e400}}</tool_call>',
        '<tool_call>{"name": "a", "arguments": {"n": NaN}}</tool_call>',
        '<tool_call>{"name": "a\\ud800", "arguments": {}}</tool_call>',
        "".join(chr(c) for c in range(0, 0x3000)),
    ]


def check_parsed(parsed: Any) -> str | None:
    if not isinstance(parsed, ParsedTurn):
        return f"returned {type(parsed).__name__}"
    if not all(isinstance(c, ToolCall) and isinstance(c.name, str) and isinstance(c.arguments, dict) for c in parsed.calls):
        return "a call that is not ToolCall(str, dict)"
    if not all(isinstance(e, ProtocolError) and isinstance(e.kind, str) and isinstance(e.message, str) for e in parsed.errors):
        return "an error that is not ProtocolError(str, str)"
    if parsed.answer is not None and (parsed.calls or not isinstance(parsed.answer, str)):
        return "an answer beside calls, or not text"
    return None


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def check_message(message: Any, finish: Any) -> str | None:
    """What is wrong with a parsed OpenAI message, as the gateway would send it (None if nothing)."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return "not an assistant message"
    if finish not in ("stop", "length", "tool_calls"):
        return f"finish reason {finish!r}"
    try:
        # As Starlette's JSONResponse renders it.
        json.dumps(message, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        return f"not sendable as JSON: {type(exc).__name__}"
    for call in message.get("tool_calls") or []:
        try:
            args = strict_json(call["function"]["arguments"])
        except ValueError:
            return "tool call arguments that are not strict JSON"
        if not isinstance(args, dict) or not isinstance(call["function"]["name"], str):
            return "a tool call that is not (name, object)"
    if message["content"] is not None and not isinstance(message["content"], str):
        return "content that is not text"
    return None


def test_protocol_parser_fuzz():
    rng = random.Random(1702)
    failures = Failures()
    turns = hostile_turns() + [random_turn(rng) for _ in range(3000)]
    for i, text in enumerate(turns):
        failures.cases += 1
        for max_calls in (8, 1, 0):
            try:
                problem = check_parsed(parse_turn(text, max_calls=max_calls))
            except BaseException as exc:  # noqa: BLE001
                problem = f"raised {type(exc).__name__}"
            if problem:
                failures.add(f"parse_turn {problem}", f"turn {i}: {str(text)[:100]!r}")
    template = ChatTemplate(TOK)
    specials = list(range(256, TOK.vocab_size))
    id_cases: list[list[int]] = [[], [TOK.eos_id], specials, [-1, -(2**70), 2**70, TOK.vocab_size, 10**400]]
    id_cases += [TOK.encode(t) for t in hostile_turns() if isinstance(t, str) and len(t) < 20_000 and "\ud800" not in t]
    id_cases += [TOK.encode(f"<tool_call>{f}</tool_call>") for f in FRAGMENTS if f.startswith("{")]
    for _ in range(1500):
        r = rng.random()
        if r < 0.4:
            ids = [rng.randrange(-3, TOK.vocab_size + 3) for _ in range(rng.randint(0, 300))]
        elif r < 0.8:
            ids = TOK.encode(random_turn(rng).encode("utf-8", "replace").decode("utf-8", "replace"))
            for _ in range(rng.randint(0, 3)):
                if ids:
                    ids[rng.randrange(len(ids))] = rng.choice([*specials, rng.randrange(256)])
        else:
            ids = [rng.choice(specials) if rng.random() < 0.3 else rng.randrange(256) for _ in range(rng.randint(0, 50))]
        id_cases.append(ids)
    for ids in id_cases:
        failures.cases += 1
        finish = rng.choice(["stop", "length", "", "garbage"])
        try:
            problem = check_message(*template.parse(ids, finish, rng.choice(["call", "", "call_" + "9" * 40])))
        except BaseException as exc:  # noqa: BLE001
            problem = f"raised {type(exc).__name__}: {str(exc)[:80]}"
        if problem:
            failures.add(f"ChatTemplate.parse {problem}", f"{ids[:40]}")
    failures.check()


def test_chat_template_encode_raises_only_chat_format_errors():
    rng = random.Random(1703)
    failures = Failures()
    for style in ("full", "brief"):
        template = ChatTemplate(TOK, tool_style=style)
        for _ in range(800):
            failures.cases += 1
            # What the gateway can receive: JSON (string keys, no tuples), lone surrogates included.
            messages, tools = json.loads(json.dumps([random_messages(rng), random_tools(rng)]))
            try:
                template.encode(messages, tools)
            except ChatFormatError as exc:
                if len(str(exc).splitlines()) != 1:
                    failures.add(f"{style}: a multi-line ChatFormatError", str(exc)[:200])
            except BaseException as exc:  # noqa: BLE001
                failures.add(f"{style}: encode raised {type(exc).__name__}", f"{exc} <- {messages!r:.150} {tools!r:.150}")
    failures.check()



GOOD_TOOL = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def random_content(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.5:
        return rng.choice(["What is 2+3?", "hi", "", "<answer>x</answer>", "\ud800", "a\x00b", "<tool_call>"])
    if r < 0.7:
        return [{"type": "text", "text": "part"}, rng.choice([{"type": "image_url"}, {"type": "text", "text": 5},
                                                               {"type": "text", "text": "ok"}, "x", None])]
    return junk(rng)


def random_tool_call(rng: random.Random) -> Any:
    call = {"id": rng.choice(["call_1", "call_2", 5, None, ["x"], {"a": 1}, ""]), "type": "function",
            "function": {"name": rng.choice(["calculate", 5, None, "", "\ud800"]),
                         "arguments": rng.choice(['{"expression": "2+3"}', "{}", "[1]", "NaN", '{"a": NaN}',
                                                  "9" * 5000, 5, None, {"a": 1}, "{" * 5000, '"\\ud800"'])}}
    if rng.random() < 0.3:
        set_key(call, rng.choice(["id", "type", "function", "function.name", "function.arguments"]), junk(rng))
    return call if rng.random() < 0.9 else junk(rng)


def random_message(rng: random.Random) -> Any:
    role = rng.choice(["system", "developer", "user", "user", "assistant", "assistant", "tool", "function",
                       "", None, 5, "USER"])
    message: dict[str, Any] = {"role": role, "content": random_content(rng)}
    if role == "assistant" and rng.random() < 0.6:
        message["tool_calls"] = rng.choice([[random_tool_call(rng) for _ in range(rng.randint(0, 3))],
                                            junk(rng), 5, "call", {"id": "x"}])
        if rng.random() < 0.5:
            message["content"] = None
    if role == "assistant" and rng.random() < 0.3:
        message["reasoning_content"] = rng.choice(["thought", "\ud800", 5, None, ["x"]])
    if role == "tool":
        message["tool_call_id"] = rng.choice(["call_1", "call_2", 5, None, ["x"], "\ud800"])
    if rng.random() < 0.1:
        message[rng.choice(["role", "content", "name", "tool_calls", "extra"])] = junk(rng)
    return message if rng.random() < 0.95 else junk(rng)


def random_messages(rng: random.Random) -> Any:
    if rng.random() < 0.05:
        return junk(rng)
    messages = [{"role": "user", "content": "What is 2+3?"}] if rng.random() < 0.6 else []
    if messages and rng.random() < 0.5:
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calculate", "arguments": '{"expression": "2+3"}'}}]})
    messages += [random_message(rng) for _ in range(rng.randint(0, 4))]
    return messages


def random_tools(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.3:
        return None
    if r < 0.4:
        return junk(rng)
    tools = []
    for _ in range(rng.randint(0, 3)):
        tool = copy.deepcopy(GOOD_TOOL)
        if rng.random() < 0.6:
            set_key(tool, rng.choice(["type", "function", "function.name", "function.description", "function.parameters",
                                      "function.parameters.properties", "function.parameters.properties.expression",
                                      "function.parameters.required"]), junk(rng))
        tools.append(tool if rng.random() < 0.9 else junk(rng))
    return tools




def sample_groups() -> list[Group]:
    def traj(gid: str, seed: int) -> Trajectory:
        call, answer = TOK.encode("<tool_call>{}</tool_call>"), TOK.encode("<answer>5</answer>")
        turns = [Turn(sampled_ids=call, logprobs=[-0.5] * len(call), policy_version=1,
                      observation_ids=TOK.encode('<tool_result name="calc">5</tool_result>\n')),
                 Turn(sampled_ids=answer, logprobs=[-0.25] * len(answer), policy_version=2)]
        return Trajectory(task_id="calc-1", group_id=gid, prompt_ids=[TOK.bos_id, *TOK.encode("What is 2+3?")],
                          turns=turns, reward=float(seed), terminated=True, timings={"env": 0.1},
                          error_counts={"bad_json": seed})

    return [Group(task_id="calc-1", group_id="g0", trajectories=[traj("g0", 0), traj("g0", 1)]),
            Group(task_id="calc-1", group_id="g1", trajectories=[traj("g1", 1)], attempts=2)]


def foreign_tables() -> dict[str, pa.Table]:
    """Parquet contents that are not Forge rollouts, or are but with wrong types or values."""
    good = pa.Table.from_batches([to_record_batch(sample_groups())])

    def replace_column(name: str, array: pa.Array) -> pa.Table:
        i = good.schema.get_field_index(name)
        return good.set_column(i, pa.field(name, array.type), array)

    n = good.num_rows
    newer = good.replace_schema_metadata({b"forge.schema": b"trajectory", b"forge.schema_version": b"99"})
    junk_version = good.replace_schema_metadata({b"forge.schema_version": b"abc"})
    return {
        "other schema": pa.table({"x": [1, 2, 3]}),
        "no rows": pa.Table.from_batches([], schema=TRAJECTORY_SCHEMA),
        "newer version": newer,
        "junk version": junk_version,
        "token_ids as strings": replace_column("token_ids", pa.array([["a"]] * n)),
        "token_ids null": replace_column("token_ids", pa.array([None] * n, type=pa.list_(pa.int32()))),
        "reward as string": replace_column("reward", pa.array(["high"] * n)),
        "reward null": replace_column("reward", pa.array([None] * n, type=pa.float64())),
        "prompt_len negative": replace_column("prompt_len", pa.array([-5] * n, type=pa.int32())),
        "prompt_len huge": replace_column("prompt_len", pa.array([2**31 - 1] * n, type=pa.int32())),
        "turn lengths off": replace_column("turn_sampled_len", pa.array([[1, 2]] * n, type=pa.list_(pa.int32()))),
        "token ids out of vocabulary": replace_column(
            "token_ids", pa.array([[10**6] * len(t) for t in good.column("token_ids").to_pylist()], type=pa.list_(pa.int32()))),
        "timings as list": replace_column("timings", pa.array([[1.0]] * n)),
        "group_attempts as float": replace_column("group_attempts", pa.array([1.5] * n)),
    }


def corrupt_files(source: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """(description, file contents) of every byte-level corruption of a Parquet file."""
    cases = [("empty", b""), ("zero bytes", bytes(len(source))), ("text", b"hello, not parquet\n"),
             ("json", b'{"not": "parquet"}'), ("magic only", b"PAR1"), ("magic twice", b"PAR1PAR1"),
             ("random", rng.randbytes(len(source))), ("doubled", source + source), ("appended junk", source + b"junk")]
    offsets = sorted({0, 1, 3, 4, 8, len(source) // 2, len(source) - 8, len(source) - 4, len(source) - 1}
                     | {rng.randrange(len(source)) for _ in range(40)})
    cases += [(f"truncated at {k}", source[:k]) for k in offsets]
    cases += [(f"{k} bytes cut from the start", source[k:]) for k in (1, 4, 100)]
    for i in range(150):
        flipped = bytearray(source)
        # Most flips land in the footer (the last ~1.5 KiB), where the structure is.
        for _ in range(rng.randint(1, 12)):
            pos = rng.randrange(len(source)) if rng.random() < 0.4 else len(source) - 1 - rng.randrange(min(1500, len(source)))
            flipped[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        cases.append((f"flip {i}", bytes(flipped)))
    return cases


def test_inspect_corrupt_runs_fuzz(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(1704)
    run = tmp_path / "runs" / "quickstart-20260101-000000"
    rollout = run / "rollouts" / "step-000001.parquet"
    write_parquet(sample_groups(), rollout)
    source = rollout.read_bytes()
    config_text = dump_yaml(load_recipe(QUICKSTART))
    (run / "config.yaml").write_text(config_text)
    metrics_good = json.dumps({"step": 0, "eval/reward_mean": 0.5}) + "\n" + json.dumps({"step": 1, "train/loss": 0.1}) + "\n"
    (run / "metrics.jsonl").write_text(metrics_good)
    failures = Failures()
    argvs = [["inspect", str(run)], ["inspect", str(run), "--step", "1"], ["inspect", run.name, "--trajectory", "2"]]

    def attempt(what: str, argvs: list[list[str]], names: Sequence[str]) -> None:
        for argv in argvs:
            failures.cases += 1
            result = run_forge(argv, capsys)
            if isinstance(result, str):
                failures.add(f"forge inspect {result.split(':')[0]}", f"{what} {argv[2:]}: {result}")
                continue
            problem = one_line_error(*result, names)
            if problem:
                failures.add(f"forge inspect: {problem}", f"{what} {argv[2:]}: {result[1][:200]!r}")

    attempt("the good run", argvs, [])
    for what, contents in corrupt_files(source, rng):
        rollout.write_bytes(contents)
        attempt(what, argvs, [rollout.name])
    for what, table in foreign_tables().items():
        pq.write_table(table, rollout)
        attempt(what, argvs, [rollout.name])
    rollout.write_bytes(source)
    # Bad arguments on a good run.
    for step, trajectory in [(0, 0), (-1, 0), (2, 0), (10**12, 0), (1, -1), (1, 3), (1, 10**9)]:
        attempt(f"--step {step} --trajectory {trajectory}",
                [["inspect", str(run), "--step", str(step), "--trajectory", str(trajectory)]], ["step", "trajectory"])
    # A broken metrics file beside good rollouts.
    for what, text in [("bad json", "{not json\n"), ("a list", "[1, 2]\n"), ("string reward", '{"step": 0, "eval/reward_mean": "x"}\n'),
                       ("no step", '{"eval/reward_mean": 0.5}\n'), ("null reward", '{"step": 1, "eval/reward_mean": null}\n'),
                       ("mismatch without max", '{"step": 1, "train/loss": 0.1, "mismatch/logprob_abs_mean": 1}\n'),
                       ("binary", "\x00\xff\xfe"), ("huge int", '{"step": 1, "eval/reward_mean": ' + "9" * 5000 + "}\n")]:
        (run / "metrics.jsonl").write_bytes(text.encode("utf-8", "surrogateescape"))
        attempt(f"metrics {what}", argvs[:1], ["metrics.jsonl"])
    (run / "metrics.jsonl").write_text(metrics_good)
    # The rollout file replaced by a folder, a dangling link; the rollouts folder by a file.
    rollout.unlink()
    rollout.mkdir()
    attempt("rollout is a folder", argvs[:2], [rollout.name])
    rollout.rmdir()
    rollout.symlink_to(tmp_path / "nowhere.parquet")
    attempt("dangling link", argvs[:2], [rollout.name])
    rollout.unlink()
    (run / "rollouts").rmdir()
    (run / "rollouts").write_text("not a folder")
    attempt("rollouts is a file", argvs[:2], ["rollouts"])
    # No config.yaml, a folder in its place, and runs that are not folders at all.
    (run / "config.yaml").unlink()
    attempt("no config.yaml", argvs[:1], [str(run)])
    (run / "config.yaml").mkdir()
    attempt("config.yaml is a folder", argvs[:1], [str(run)])
    for name in ["", "nowhere", str(tmp_path / "nowhere"), "\x00", "a" * 5000, str(run / "rollouts")]:
        attempt(f"run {name[:20]!r}", [["inspect", name]], [])
    failures.check()



OUTPUTS = [
    "<answer>5</answer>",
    '<tool_call>{"name": "calculate", "arguments": {"expression": "2+3"}}</tool_call>',
    '<tool_call>{"name": "calculate", "arguments": {"x": NaN}}</tool_call>',
    '<tool_call>{"name": "calc\\ud800", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "calculate", "arguments": {"x": ' + "9" * 5000 + "}}</tool_call>",
    "<think>hmm</think>plain text",
    "<tool_call>{" + "[" * 3000,
]


class FixedGenerator:
    """A `Generator` whose output is one of OUTPUTS (or raw bytes), chosen by the prompt's checksum."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        out = []
        for prompt in prompts:
            k = zlib.crc32(bytes(i % 256 for i in prompt)) % (len(OUTPUTS) + 1)
            ids = TOK.encode(OUTPUTS[k]) if k < len(OUTPUTS) else list(random.Random(k).randbytes(30))
            ids = (ids + [TOK.eos_id])[: params.max_new_tokens]
            completion = Completion(ids, [-0.5] * len(ids), "stop", policy_version=1)
            if params.top_logprobs:
                completion.extra["top_logprobs"] = [[(t, -0.5)] * params.top_logprobs for t in ids]
            out.append(completion)
        return out


@pytest.fixture(scope="module")
def gateway():
    engine = BatchingEngine(FixedGenerator(), gather_s=0.0, max_gather_s=0.0)
    store = SessionStore()
    server = GatewayServer(create_app(engine, TOK, store, GatewayConfig(default_max_tokens=64, max_context_tokens=4096))).start()
    yield server.base_url.removesuffix("/v1")
    server.stop()
    engine.close()


def check_answer(response: httpx.Response) -> str | None:
    """What is wrong with a gateway answer (None if nothing)."""
    if response.status_code >= 500:
        return f"status {response.status_code}"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        if response.status_code != 200:
            return "an event stream with an error status"
        for line in response.text.split("\n\n"):
            if line and line != "data: [DONE]":
                try:
                    strict_json(line.removeprefix("data: "))
                except ValueError:
                    return "an event that is not strict JSON"
        return None
    try:
        body = strict_json(response.content)
    except ValueError:
        return f"a non-JSON body with status {response.status_code}"
    if response.status_code == 200:
        return None
    if not 400 <= response.status_code < 500:
        return f"status {response.status_code}"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict) \
            or set(body["error"]) != {"message", "type", "param", "code"}:
        return "not OpenAI's error format"
    message = body["error"]["message"]
    if not isinstance(message, str) or not message or len(message.splitlines()) != 1:
        return "an error message that is not one line"
    if len(message) > 2000:
        return f"a {len(message)}-character error message"
    return None


def valid_body(rng: random.Random) -> dict:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2+3?"}]}
    for name, values in [("tools", [[GOOD_TOOL]]), ("temperature", [0, 0.7, 2]), ("top_p", [0.5, 1]),
                         ("max_tokens", [1, 8, 10**6]), ("n", [1, 2]), ("seed", [0, 7]), ("stop", ["5", ["x", "y"]]),
                         ("logprobs", [True, False]), ("stream", [True, False]), ("user", ["u1", "u2"]),
                         ("tool_choice", ["auto", "none"])]:
        if rng.random() < 0.3:
            body[name] = rng.choice(values)
    if body.get("logprobs") and rng.random() < 0.5:
        body["top_logprobs"] = rng.randint(0, 5)
    if body.get("stream") and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


CHAT_FIELDS = ["model", "messages", "tools", "tool_choice", "temperature", "top_p", "max_tokens", "max_completion_tokens",
               "n", "seed", "stop", "logprobs", "top_logprobs", "stream", "stream_options", "user", "frequency_penalty",
               "presence_penalty", "logit_bias", "metadata", "response_format", "unknown_field"]


def random_chat_body(rng: random.Random) -> tuple[bytes, dict[str, Any]]:
    """(raw body, extra headers) of a random chat request."""
    headers: dict[str, Any] = {}
    if rng.random() < 0.1:
        headers["content-type"] = rng.choice(["text/plain", "multipart/form-data; boundary=x", "application/xml", ""])
    if rng.random() < 0.2:
        headers["X-Forge-Session"] = rng.choice(["s1", "s2", "x" * 4000, "a b", "é".encode(), b"\xff", ""])
    r = rng.random()
    if r < 0.05:
        return rng.randbytes(rng.randint(0, 500)), headers
    if r < 0.08:
        return b'{"model": "' + bytes([0xff, 0xfe, 0xc3]) + b'", "messages": []}', headers
    if r < 0.11:
        return json.dumps(junk(rng)).encode(), headers
    if r < 0.14:
        depth = rng.choice([500, 5000, 100_000])
        return b'{"model": "forge-policy", "messages": ' + b"[" * depth + b"]" * depth + b"}", headers
    if r < 0.17:
        raw = rng.choice(["1e400", "9" * 5000, "NaN", "-Infinity", "1" + "0" * 400, "-0"])
        field = rng.choice(["temperature", "top_p", "max_tokens", "n", "seed", "top_logprobs", "model"])
        return f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "{field}": {raw}}}'.encode(), headers
    body = valid_body(rng)
    if r < 0.5:
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(CHAT_FIELDS)
            body[name] = junk(rng) if rng.random() < 0.5 else rng.choice(SCALARS)
    elif r < 0.75:
        body["messages"] = random_messages(rng)
        body["tools"] = random_tools(rng)
    elif r < 0.85:
        body["tool_choice"] = rng.choice([{"type": "function", "function": {"name": "calculate"}},
                                          {"type": "function", "function": {"name": ["x"]}},
                                          {"type": "function", "function": "calculate"}, "required", junk(rng)])
        body["tools"] = rng.choice([[GOOD_TOOL], [{"type": "function", "function": "calculate"}], [{}], None])
    if rng.random() < 0.02:
        body["messages"] = [{"role": "user", "content": "x" * 3_000_000}]
    try:
        return json.dumps(body).encode(), headers
    except ValueError:
        return b"{}", headers


def test_gateway_endpoints_fuzz(gateway):
    rng = random.Random(1705)
    failures = Failures()
    client = httpx.Client(base_url=gateway, timeout=60)

    def send(method: str, path: str, content: bytes | None = None, headers: dict[str, Any] | None = None) -> None:
        failures.cases += 1
        case = f"{method} {path[:80]} {(content or b'')[:150]!r}"
        try:
            response = client.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            failures.add(f"no answer ({type(exc).__name__})", case)
            return
        problem = check_answer(response)
        if problem:
            failures.add(problem, f"{case} -> {response.status_code} {response.text[:150]!r}")

    # A session to reward and fetch.
    assert client.post("/v1/chat/completions", json=valid_body(random.Random(0)),
                       headers={"X-Forge-Session": "known"}).status_code == 200
    for _ in range(1000):
        body, headers = random_chat_body(rng)
        send("POST", "/v1/chat/completions", body, headers)
    paths = ["/", "/v1", "/v1/", "/v1/chat", "/v1/chat/completions/", "/v1/models", "/v1/models/forge-policy",
             "/v1/models/%2F", "/v1/models/" + "x" * 5000, "/%00", "/%0A", "/..%2f..%2fetc/passwd", "/forge/health",
             "/forge/sessions/", "/forge/sessions/known", "/forge/sessions/a/b/reward", "/v1/chat/completions?x=%ff",
             "/v1/models/%ED%A0%80", "/v1/models/%FF", "/v1/models/a%0Ab"]
    for _ in range(300):
        path = rng.choice(paths) if rng.random() < 0.7 else "/" + "/".join(
            rng.choice(["v1", "forge", "sessions", "models", "chat", "%20", "%2F", "..", "x"]) for _ in range(rng.randint(0, 5)))
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
        send(method, path, json.dumps(junk(rng)).encode() if method in ("POST", "PUT", "PATCH") else None)
    ids = ["known", "unknown", "a%2Fb", "%2F", "%00", "%0A%0D", "%ED%A0%80", "%FF", "x" * 8000, "%20", "..", "%252F",
           "%E2%80%A8", "%1B%5B31m"]
    reward_bodies = [b'{"reward": 1}', b'{"reward": 1e400}', b'{"reward": ' + b"1" + b"0" * 400 + b"}",
                     b'{"reward": ' + b"9" * 5000 + b"}", b'{"reward": NaN}', b'{"reward": "1"}', b'{"reward": true}',
                     b'{"reward": null}', b"[1]", b"", b"\xff\xfe", b'{"reward": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                     b"[" * 100_000 + b"]" * 100_000, b'"' + b"x" * 3_000_000 + b'"', b'{"reward": -0.0}']
    for _ in range(300):
        session = rng.choice(ids)
        r = rng.random()
        if r < 0.3:
            send("GET", f"/forge/sessions/{session}")
        elif r < 0.4:
            send("DELETE", f"/forge/sessions/{session}")
        else:
            body = rng.choice(reward_bodies) if rng.random() < 0.8 else json.dumps(junk(rng)).encode()
            send("POST", f"/forge/sessions/{session}/reward", body)
    # Still serving.
    response = client.post("/v1/chat/completions", json=valid_body(random.Random(1)))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    client.close()
    failures.check()
