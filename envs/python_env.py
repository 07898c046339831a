"""Python: number puzzles solved by running code in a sandbox with a `run_python` tool.

Each task asks for one integer that is tedious by hand and easy with a short program (a sum of
primes, a digit-sum count, a Fibonacci number modulo m, the longest Collatz chain). The code
runs in `envs.sandbox`: a separate process with no network, CPU, memory and output limits, a
temporary working directory and a wall-clock timeout; what the sandbox stopped comes back in the
tool's result. Difficulty scales the numbers, so brute force stops fitting the time limits.
"""

from __future__ import annotations

import random
import re
from typing import Generator

from envs.sandbox import SandboxLimits, run_python
from forge.agent_side import ToolEnv, tool
from forge.policy.protocol import render_tool_call, tool_results


def _primes_below(n: int) -> list[int]:
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return [i for i in range(n) if sieve[i]]


def _fib_mod(n: int, m: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, (a + b) % m
    return a


def _longest_collatz(n: int) -> int:
    """The start below n with the longest Collatz chain, smallest on ties (memoized walk)."""
    length = {1: 1}
    best, best_len = 1, 1
    for start in range(2, n):
        path, x = [], start
        while x not in length:
            path.append(x)
            x = x // 2 if x % 2 == 0 else 3 * x + 1
        steps = length[x]
        for y in reversed(path):
            steps += 1
            length[y] = steps
        if length[start] > best_len:
            best, best_len = start, length[start]
    return best


def _task(kind: str, rng: random.Random, scale: int) -> tuple[str, int]:
    if kind == "primes":
        n = rng.randint(100, 1000) * scale
        return f"What is the sum of all prime numbers below {n}?", sum(_primes_below(n))
    if kind == "digits":
        n, k = rng.randint(100, 1000) * scale, rng.randint(3, 9)
        count = sum(1 for i in range(1, n + 1) if sum(map(int, str(i))) % k == 0)
        return f"How many integers from 1 to {n} have a digit sum divisible by {k}?", count
    if kind == "fibonacci":
        n, m = rng.randint(50, 500) * scale, rng.randint(1000, 100000)
        return f"What is the {n}-th Fibonacci number modulo {m}, with F(0) = 0 and F(1) = 1?", _fib_mod(n, m)
    n = rng.randint(100, 1000) * scale
    return f"Which starting number below {n} has the longest Collatz chain (the smallest one if tied)?", _longest_collatz(n)


class PythonEnv(ToolEnv):
    """Integer puzzles to solve by running Python; difficulty 0..2 scales the numbers by 10x each."""

    max_turns = 6
    tool_timeout_s = 30.0
    limits = SandboxLimits(wall_s=10.0, cpu_s=5, memory_mb=512)

    def make_task(self, rng: random.Random) -> tuple[str, int]:
        scale = 10 ** max(0, min(self.difficulty, 2))
        kind = rng.choice(("primes", "digits", "fibonacci", "collatz"))
        question, answer = _task(kind, rng, scale)
        return question + " Answer with the number only.", answer

    @tool
    def run_python(self, code: str) -> str:
        """Run a Python script in a sandbox (no network, limited time and memory) and return what it printed.

        Args:
            code: The whole script; print the values you need.
        """
        return run_python(code, self.limits).report()

    def score(self, answer: str, expected: int) -> float:
        try:
            return float(int(answer.strip()) == expected)
        except ValueError:
            return 0.0

    def oracle(self, prompt: str) -> Generator[str, str, None]:
        """Write a short program for the question's kind, run it, answer what it printed."""
        if m := re.search(r"sum of all prime numbers below (\d+)", prompt):
            code = (f"n = {m.group(1)}\nsieve = bytearray([1]) * n\nsieve[0] = sieve[1] = 0\n"
                    "for i in range(2, int(n**0.5) + 1):\n    if sieve[i]:\n        sieve[i*i::i] = bytearray(len(range(i*i, n, i)))\n"
                    "print(sum(i for i in range(n) if sieve[i]))")
        elif m := re.search(r"from 1 to (\d+) have a digit sum divisible by (\d+)", prompt):
            code = f"print(sum(1 for i in range(1, {m.group(1)} + 1) if sum(map(int, str(i))) % {m.group(2)} == 0))"
        elif m := re.search(r"the (\d+)-th Fibonacci number modulo (\d+)", prompt):
            code = f"a, b = 0, 1\nfor _ in range({m.group(1)}):\n    a, b = b, (a + b) % {m.group(2)}\nprint(a)"
        else:
            n = re.search(r"below (\d+) has the longest Collatz", prompt).group(1)
            code = ("import sys\nsys.setrecursionlimit(100000)\nmemo = {1: 1}\n"
                    "def steps(x):\n    if x not in memo:\n        memo[x] = 1 + steps(x // 2 if x % 2 == 0 else 3 * x + 1)\n"
                    f"    return memo[x]\nprint(max(range(1, {n}), key=lambda i: (steps(i), -i)))")
        reply = yield "<think>A short program does it.</think>" + render_tool_call("run_python", {"code": code})
        yield "<answer>" + tool_results(reply)[0].splitlines()[0] + "</answer>"
