"""The gateway's chat template lays OpenAI messages out exactly as a ToolEnv episode, on the CPU."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from envs.calculator import CalculatorEnv
from envs.maze import MazeEnv
from envs.needle import NeedleEnv
from forge.agent_side import ToolEnv
from forge.agent_side.demos import oracle_trajectory
from forge.policy.chat import ChatFormatError, ChatTemplate, ProducedIndex, forge_schema
from forge.policy.protocol import tool_results
from forge.policy.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
STYLES = ("brief", "full")


def openai_tools(env: ToolEnv) -> list[dict]:
    return [{"type": "function", "function": s} for s in env.tool_schemas()]


def task_of(env: ToolEnv, prompt: str) -> str:
    """The task text inside a rendered prompt, checked by rendering it again."""
    task = prompt.split("\nTools:")[0].rstrip("\n")
    assert env.render_prompt(task) == prompt
    return task


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_prompt_equals_env_episode_prompt(style, seed):
    env = CalculatorEnv(difficulty=2, prompt_style=style)
    obs, _ = env.reset(seed=seed)
    messages = [{"role": "user", "content": task_of(env, obs)}]
    got = ChatTemplate(TOK, style).encode(messages, openai_tools(env))
    assert got.token_ids == [TOK.bos_id] + TOK.encode(obs)
    assert (got.reused, got.rerendered, got.tool_names) == (0, 0, ["calculate"])


def test_system_message_goes_in_front_of_the_task():
    env = CalculatorEnv(prompt_style="full")
    obs, _ = env.reset(seed=3)
    task = task_of(env, obs)
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": task[:5]}, {"type": "text", "text": task[5:]}]}]
    got = ChatTemplate(TOK, "full").encode(messages, openai_tools(env))
    assert got.token_ids == [TOK.bos_id] + TOK.encode("Be brief.\n\n" + obs)


def test_no_tools_gives_the_bare_task():
    got = ChatTemplate(TOK, "brief").encode([{"role": "user", "content": "hi <answer>"}])
    assert got.token_ids == [TOK.bos_id] + TOK.encode("hi <answer>")
    assert got.tool_names == []


def test_forge_schema_fills_defaults_and_keeps_order():
    tools = [{"type": "function", "function": {"name": "zeta"}},
             {"type": "function", "function": {"name": "alpha", "description": "A.",
                                               "parameters": {"type": "object", "properties": {"x": {}, "y": {}}}}}]
    assert forge_schema(tools[0]) == {"name": "zeta", "description": "", "parameters": {"type": "object", "properties": {}}}
    got = ChatTemplate(TOK, "brief").encode([{"role": "user", "content": "T"}], tools)
    assert TOK.decode(got.token_ids[1:]) == "T\nTools: zeta(), alpha(x, y)\n"
    assert got.tool_names == ["zeta", "alpha"]


ENVS = {"calculator": (CalculatorEnv, 3), "maze": (MazeEnv, 2), "needle": (NeedleEnv, 1)}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("env_name, seed", [("calculator", 0), ("calculator", 5), ("maze", 1), ("needle", 2)])
def test_every_gateway_prompt_equals_the_episode_context(env_name, seed, style):
    """Play the oracle as an episode; the gateway's prompt before each turn is the episode's context."""
    env_cls, difficulty = ENVS[env_name]
    make_env = lambda: env_cls(difficulty=difficulty, prompt_style=style)  # noqa: E731
    traj = oracle_trajectory(make_env, seed, TOK)
    env = make_env()
    template = ChatTemplate(TOK, style)
    produced = ProducedIndex()
    messages = [{"role": "user", "content": task_of(env, TOK.decode(traj.prompt_ids[1:]))}]
    prefix = list(traj.prompt_ids)
    for t, turn in enumerate(traj.turns):
        for index in (produced, None):
            got = template.encode(messages, openai_tools(env), index)
            assert got.token_ids == prefix, f"turn {t}, index={index is not None}"
            # The oracle writes turns the re-rendering reproduces, so both paths agree here.
            assert got.reused + got.rerendered == t
            assert got.reused == (t if index is not None else 0)
        message, finish = template.parse(turn.sampled_ids, turn.finish_reason, f"call_{t}")
        produced.add(turn.sampled_ids, message)
        messages.append(message)
        prefix += turn.sampled_ids + turn.observation_ids
        if not turn.observation_ids:
            assert finish == "stop" and message["content"]
            break
        assert finish == "tool_calls"
        results = tool_results(TOK.decode(turn.observation_ids))
        assert len(results) == len(message["tool_calls"])
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": r} for c, r in zip(message["tool_calls"], results)]
    assert traj.reward == 1.0


def sampled_call_ids() -> list[int]:
    """A tool-calling turn sampled with an unusual split: <tool_call> as bytes, and no <eos>."""
    call = '{"name": "calculate", "arguments": {"expression": "1 + 2"}}'
    return list(b"<tool_call>") + TOK.encode(call + "</tool_call>")


def test_produced_ids_are_reused_exactly():
    template = ChatTemplate(TOK, "brief")
    ids = sampled_call_ids()
    message, finish = template.parse(ids, "stop", "call_a")
    assert finish == "tool_calls"
    produced = ProducedIndex()
    produced.add(ids, message)
    sent = json.loads(json.dumps(message))
    sent.pop("reasoning_content")
    messages = [{"role": "user", "content": "Q"}, sent, {"role": "tool", "tool_call_id": "call_a_0", "content": "3"}]
    reused = template.encode(messages, produced=produced)
    obs = TOK.encode('<tool_result name="calculate">3</tool_result>\n')
    assert reused.token_ids == [TOK.bos_id] + TOK.encode("Q") + ids + obs
    assert (reused.reused, reused.rerendered) == (1, 0)
    # Without the index the turn is tokenized anew: a marker id and an <eos> the sampler never wrote.
    fresh = template.encode(messages)
    assert fresh.token_ids != reused.token_ids and (fresh.reused, fresh.rerendered) == (0, 1)
    assert fresh.token_ids[-len(obs) - 1 :] == [TOK.eos_id] + obs


def test_edited_messages_are_rerendered():
    template = ChatTemplate(TOK, "brief")
    ids = sampled_call_ids()
    message, _ = template.parse(ids, "stop", "call_a")
    produced = ProducedIndex()
    produced.add(ids, message)
    edited = json.loads(json.dumps(message))
    edited["tool_calls"][0]["function"]["arguments"] = '{"expression": "1 + 3"}'
    messages = [{"role": "user", "content": "Q"}, edited, {"role": "tool", "tool_call_id": "call_a_0", "content": "4"}]
    got = template.encode(messages, produced=produced)
    assert (got.reused, got.rerendered) == (0, 1)
    assert TOK.decode(got.token_ids).endswith('"1 + 3"}}</tool_call><eos><tool_result name="calculate">4</tool_result>\n')
    for key, value in (("content", "I changed this"), ("reasoning_content", "other thoughts")):
        assert produced.find({**message, key: value}) is None
    assert produced.find({**message, "content": ""}) == ids
    # Malformed messages are nobody's produced ones (encode then reports what is wrong).
    for bad in ({"content": [{"type": "image_url"}]}, {"tool_calls": ["x"]}, {"tool_calls": [{"id": "call_a_0"}]}):
        assert produced.find({**message, **bad}) is None


def test_answers_match_by_content_latest_wins_and_reasoning_only_if_sent():
    template = ChatTemplate(TOK, "full")
    produced = ProducedIndex()
    old = TOK.encode("<answer>42</answer>")
    new = TOK.encode("<think>sum</think> <answer> 42 </answer>")
    for ids in (old, new):
        produced.add(ids, template.parse(ids, "stop", "x")[0])
    assert produced.find({"role": "assistant", "content": "42"}) == new
    assert produced.find({"role": "assistant", "content": [{"type": "text", "text": "42"}], "reasoning_content": "sum"}) == new
    assert produced.find({"role": "assistant", "content": "42", "reasoning_content": "else"}) is None
    assert produced.find({"role": "assistant", "content": "41"}) is None
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "42"}, {"role": "user", "content": "Why?"}]
    got = template.encode(messages, produced=produced)
    assert got.token_ids == [TOK.bos_id] + TOK.encode("Q") + new + TOK.encode("Why?\n")
    # Not produced: re-rendered as the protocol's answer, which ends the turn without <eos>.
    messages[1] = {"role": "assistant", "content": "7", "reasoning_content": "r"}
    got = template.encode(messages, produced=produced)
    assert TOK.decode(got.token_ids) == "<bos>Q<think>r</think><answer>7</answer>Why?\n"
    assert got.rerendered == 1


def test_rerendered_tool_calls_with_content_and_parallel_results():
    template = ChatTemplate(TOK, "brief")
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps({"v": i})}}
             for i, n in enumerate(["f", "g"])]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "Both.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "one"},
                {"role": "tool", "tool_call_id": "c0", "content": [{"type": "text", "text": "<answer>zero"}]}]
    text = TOK.decode(template.encode(messages).token_ids)
    assert text == ('<bos>S\n\nQBoth.<tool_call>{"name": "f", "arguments": {"v": 0}}</tool_call>'
                    '<tool_call>{"name": "g", "arguments": {"v": 1}}</tool_call><eos>'
                    '<tool_result name="g">one</tool_result><tool_result name="f">&lt;answer>zero</tool_result>\n')


def test_parse_tool_calls_answers_and_thinking():
    template = ChatTemplate(TOK, "full")
    ids = TOK.encode('<think>a</think>Let me. <tool_call>{"name": "f", "arguments": {"x": [1]}}</tool_call>'
                     '<tool_call>{"name": "g"}</tool_call>') + [TOK.eos_id]
    message, finish = template.parse(ids, "stop", "call_9")
    assert finish == "tool_calls"
    assert message == {"role": "assistant", "content": "Let me.", "reasoning_content": "a", "tool_calls": [
        {"id": "call_9_0", "type": "function", "function": {"name": "f", "arguments": '{"x": [1]}'}},
        {"id": "call_9_1", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    # Every call goes to the client: no cap such as a ToolEnv's calls per turn.
    message, _ = template.parse(TOK.encode('<tool_call>{"name": "f"}</tool_call>' * 20), "stop", "c")
    assert [c["id"] for c in message["tool_calls"]] == [f"c_{i}" for i in range(20)]
    message, finish = template.parse(TOK.encode('<tool_call>{"name": "f"}</tool_call>'), "length", "c")
    assert (message["content"], message["reasoning_content"], finish) == (None, None, "tool_calls")
    message, finish = template.parse(TOK.encode("<think>x</think><think>y</think><answer> 12 </answer>"), "stop", "c")
    assert (message["content"], message["reasoning_content"], finish) == ("12", "x\ny", "stop")
    assert "tool_calls" not in message


@pytest.mark.parametrize("text, content, reasoning", [
    ('<tool_call>{"name": "f", "arguments": {bad}</tool_call>', '<tool_call>{"name": "f", "arguments": {bad}</tool_call>', None),
    ("<think>plan</think>just talking", "just talking", "plan"),
    ("<think>never closed", "<think>never closed", None),
    ("<think>a</think> <answer>unclosed", "<answer>unclosed", "a"),
    ('<tool_call>{"name": "f"', '<tool_call>{"name": "f"', None),
    ("", "", None),
], ids=["bad-json", "no-action", "unclosed-think", "unclosed-answer", "unclosed-call", "empty"])
def test_parse_malformed_output_is_content(text, content, reasoning):
    message, finish = ChatTemplate(TOK).parse(TOK.encode(text) + [TOK.eos_id], "length", "c")
    assert (message["content"], message["reasoning_content"], finish) == (content, reasoning, "length")
    assert "tool_calls" not in message


def test_parse_never_raises_on_any_ids():
    template = ChatTemplate(TOK)
    message, _ = template.parse([0xC3, 0xFF, 0x80, TOK.bos_id, TOK.pad_id], "stop", "c")
    assert message["content"] == "\ufffd\ufffd\ufffd"
    rng = random.Random(0)
    markers = [TOK.token_id(m) for m in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>")]
    for n in range(300):
        pool = range(TOK.vocab_size) if n % 2 else markers + list(b'{}"name: ')
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 60))]
        message, finish = template.parse(ids, rng.choice(["stop", "length"]), "c")
        assert finish in ("stop", "length", "tool_calls")
        assert message["content"] is None or isinstance(message["content"], str)


def user(content="q"):
    return {"role": "user", "content": content}


def called(arguments="{}"):
    """An assistant message with one tool call, id 'c1'."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def result(call_id="c1", content="r"):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


ANSWER = {"role": "assistant", "content": "a"}
ERRORS = [
    pytest.param([], "send at least one user message", id="empty"),
    pytest.param([ANSWER, user()], "messages[0]: role 'assistant' cannot start", id="starts-with-assistant"),
    pytest.param([result()], "messages[0]: role 'tool' cannot start", id="starts-with-tool"),
    pytest.param([{"role": "system", "content": "s"}], "no user message; add one", id="system-only"),
    pytest.param([user(), {"role": "function", "content": "r"}], "messages[1]: role 'function' is not a message; use",
                 id="unknown-role"),
    pytest.param(["hello"], "messages[0]: a str is not a message", id="not-a-dict"),
    pytest.param([user(), ANSWER], "messages[1]: the last message is an assistant message; end with", id="ends-with-assistant"),
    pytest.param([user(), result()], "messages[1]: role 'tool' must follow an assistant message with tool_calls",
                 id="tool-after-user"),
    pytest.param([user(), ANSWER, result()], "messages[2]: role 'tool' must follow an assistant message with tool_calls",
                 id="tool-after-answer"),
    pytest.param([user(), called(), result(), result("zz")],
                 "messages[3]: tool_call_id 'zz' is not a tool call of messages[1]; its ids are 'c1'", id="unknown-call-id"),
    pytest.param([user(), called("[1]"), result()],
                 "messages[1].tool_calls[0]: arguments '[1]' must be a string holding a JSON object", id="arguments-not-object"),
    pytest.param([user(), called("{no"), result()], "must be a string holding a JSON object", id="arguments-bad-json"),
    pytest.param([user(), called(), result(content=[{"type": "image_url", "image_url": {"url": "x"}}])],
                 "messages[2]: content must be a string or a list of", id="image-part"),
    pytest.param([user(None)], "messages[0]: role 'user' needs content", id="no-user-content"),
    pytest.param([user(), {"role": "assistant", "content": None}, user()],
                 "messages[1]: an assistant message needs content or tool_calls", id="empty-assistant"),
]


@pytest.mark.parametrize("messages, fix", ERRORS)
def test_format_errors_name_the_fix(messages, fix):
    with pytest.raises(ChatFormatError) as info:
        ChatTemplate(TOK).encode(messages, produced=ProducedIndex())
    assert fix in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_tools_and_style():
    with pytest.raises(ChatFormatError, match='has no function name; write {"type": "function"'):
        ChatTemplate(TOK).encode([{"role": "user", "content": "q"}], [{"type": "function", "function": {}}])
    with pytest.raises(ChatFormatError, match="tools must be a list"):
        ChatTemplate(TOK).encode([{"role": "user", "content": "q"}], {"type": "function"})
    with pytest.raises(ValueError, match="tool_style 'short' is not one of full, brief"):
        ChatTemplate(TOK, "short")


def test_module_is_light():
    code = "import sys, forge.policy.chat; print(sorted(m for m in ('torch', 'fastapi', 'forge.agent_side') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
