"""A calculator agent written with the official `openai` client, as people write agents today.

It knows nothing of Forge: it sends the task and one tool, runs the tool calls the model makes,
sends the results back, and returns 1.0 when the final answer is right. `forge train
recipes/agent_calculator_openai.yaml` trains the policy behind it through the gateway; the
tasks are the calculator environment's (`envs.calculator`), so its oracle demonstrations
warm-start the policy in the very token layout these calls produce.
"""

from __future__ import annotations

import json

import openai

from envs.calculator import CalculatorEnv, safe_eval

MODEL = "forge-policy"
TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}]


def tasks(seed: int) -> dict:
    """The calculator environment's task for `seed`: a story and its answer."""
    env = CalculatorEnv(difficulty=0, prompt_style="brief")
    env.reset(seed=seed)
    return {"question": env.task, "answer": env.expected, "max_turns": env.max_turns}


def evaluate(expression: str) -> str:
    """The tool's work: the value of an arithmetic expression, or the error as text."""
    try:
        value = safe_eval(expression)
    except ValueError as exc:
        return f"error: {exc}"
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


def calculate(arguments: str) -> str:
    """The tool call as the model wrote it (JSON arguments): never raises, whatever they hold."""
    try:
        expression = str(json.loads(arguments)["expression"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"error: the arguments must be {{\"expression\": ...}} ({exc})"
    return evaluate(expression)


async def run(task: dict, client: openai.AsyncOpenAI) -> float:
    """One episode: ask, run tool calls until the model answers, score the answer."""
    messages: list[dict] = [{"role": "user", "content": task["question"]}]
    for _ in range(task["max_turns"]):
        response = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=96)
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            return score(message.content or "", task["answer"])
        for call in message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": calculate(call.function.arguments)})
    return 0.0


def score(answer: str, expected: int) -> float:
    try:
        return float(abs(float(answer.strip().replace(",", "")) - expected) < 1e-6)
    except ValueError:
        return 0.0
