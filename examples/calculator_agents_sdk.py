"""The calculator agent written with the OpenAI Agents SDK (`pip install openai-agents`).

The SDK runs the loop itself: it sends the task and the `calculate` tool over Chat Completions,
runs the tool calls, and stops at the first reply without one. Forge hands it an
`AsyncOpenAI` client pointed at the gateway; the SDK's model wraps it. The tasks are the
calculator environment's, as in examples/calculator_openai.py, so the same warm-start applies
(recipes/agent_calculator_agents_sdk.yaml).
"""

from __future__ import annotations

import openai
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner, function_tool

from examples.calculator_openai import MODEL, evaluate, score, tasks  # noqa: F401  (tasks: the recipe's agent.tasks)


@function_tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: The expression, e.g. "(12 + 3) * 4".
    """
    return evaluate(expression)


async def run(task: dict, client: openai.AsyncOpenAI) -> float:
    """One episode through the SDK's runner; 1.0 when the final answer is right."""
    agent = Agent(name="calculator", instructions=None, tools=[calculate],
                  model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
                  model_settings=ModelSettings(max_tokens=96))
    try:
        result = await Runner.run(agent, task["question"], max_turns=task["max_turns"],
                                  run_config=RunConfig(tracing_disabled=True))
    except Exception as exc:  # the SDK raises when the turn limit passes: no answer, reward 0
        if type(exc).__name__ == "MaxTurnsExceeded":
            return 0.0
        raise
    return score(str(result.final_output or ""), task["answer"])
