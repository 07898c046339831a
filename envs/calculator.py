"""Calculator: arithmetic word problems solved with a `calculate(expression)` tool.

A task is a short story about one quantity that changes over a few steps (earn, spend, group,
share); its expected answer is an integer. Difficulty sets the number of steps and the size of
the numbers. The tool evaluates arithmetic by walking Python's AST over a whitelist of nodes
(numbers, + - * / // % **, unary minus, parentheses), never with `eval`, and bounds exponents
and magnitudes so that no expression can take the process's memory or time.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from typing import Any, Callable, Generator

from forge.agent_side import ToolEnv, tool
from forge.policy.protocol import render_tool_call, tool_results

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
MAX_EXPRESSION_CHARS = 300
MAX_MAGNITUDE = 10**30
MAX_EXPONENT = 64


def safe_eval(expression: str) -> int | float:
    """Value of an arithmetic expression; ValueError naming what is not allowed."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression has {len(expression)} characters; at most {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large; at most {MAX_EXPONENT}")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        value = _BINOPS[type(node.op)](left, right)
        if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError("result out of range")
        return value
    raise ValueError(f"'{ast.unparse(node)}' is not allowed; use numbers, + - * / // % ** and parentheses")


# (sentence template, operator); the operand is drawn per step so that values stay whole.
_STEPS = (
    ("Then {who} earns {n} more coins.", "+"),
    ("Then {who} spends {n} coins.", "-"),
    ("Then the coins of {who} grow to {n} times as many.", "*"),
    ("Then {who} shares the coins equally among {n} friends and keeps one share.", "//"),
)
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana")


class CalculatorEnv(ToolEnv):
    """Word problems about a sum of coins; difficulty 0..3 sets steps (1..4) and number sizes."""

    max_turns = 6

    def make_task(self, rng: random.Random) -> tuple[str, int]:
        level = max(0, min(self.difficulty, 3))
        top = (20, 100, 1000, 10000)[level]
        who = rng.choice(_NAMES)
        value = rng.randint(2, top)
        sentences = [f"{who} has {value} coins."]
        expression = str(value)
        for _ in range(level + 1):
            template, op = rng.choice(_STEPS)
            if op == "-":
                n = rng.randint(1, value) if value > 1 else 0
            elif op == "*":
                n = rng.randint(2, 5)
            elif op == "//":
                divisors = [d for d in range(2, 13) if value % d == 0]
                if not divisors:
                    template, op, n = _STEPS[0][0], "+", rng.randint(1, top)
                else:
                    n = rng.choice(divisors)
            else:
                n = rng.randint(1, top)
            sentences.append(template.format(who=who, n=n))
            expression = f"({expression}) {op} {n}"
            value = int(safe_eval(expression))
        sentences.append(f"How many coins does {who} have now? Answer with the number only.")
        return " ".join(sentences), value

    @tool
    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

        Args:
            expression: The expression, e.g. "(12 + 3) * 4".
        """
        try:
            value = safe_eval(expression)
        except ValueError as exc:
            return f"error: {exc}"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)

    def score(self, answer: str, expected: int) -> float:
        try:
            return float(abs(float(answer.strip().replace(",", "")) - expected) < 1e-6)
        except ValueError:
            return 0.0

    def oracle(self, prompt: str) -> Generator[str, str, None]:
        """Read the story into one expression, calculate it, answer the result."""
        story = prompt.split("\nTools:")[0]
        expression = re.search(r"has (\d+) coins\.", story).group(1)
        ops = {"earns": "+", "spends": "-", "times as many": "*", "equally among": "//"}
        for sentence in re.findall(r"Then [^.]*\.", story):
            op = next(o for key, o in ops.items() if key in sentence)
            expression = f"({expression}) {op} {re.findall(r'[0-9]+', sentence)[0]}"
        # The brief style is for small models trained from scratch: no thinking to imitate.
        think = f"<think>The coins follow {expression}.</think>" if self.prompt_style == "full" else ""
        reply = yield think + render_tool_call("calculate", {"expression": expression})
        yield f"<answer>{tool_results(reply)[0]}</answer>"
