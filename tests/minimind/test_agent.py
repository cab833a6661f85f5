"""The multi-turn tool loop (minimind_fast.agent.run_agent) on a tiny real model taught to call tools: the ids of
every turn and observation against the chat format's definition, the model/observation mask, the recorded messages
and calls, every way a conversation stops, batching and seeds, and the templates the loop refuses."""

import json

import pytest

from minimind_fast.agent import AgentError, observation_ids, run_agent, tools_from_messages
from minimind_fast.engine import Engine, SamplingParams
from minimind_fast.tokenizer import Tokenizer
from minimind_fast.toolcall import Toolbox, ToolCall
from tests.minimind._agent_script import (
    CALC,
    SHORT_CALCULATOR,
    Script,
    call_text,
    observation_text,
    teach,
    user,
    with_tools,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")

TOOLS = [SHORT_CALCULATOR]
WORLD = {
    "world": "Kethmar",
    "people": [
        {"name": "Ada Brim", "age": "27", "town": "Oxwick", "profession": "baker", "colour": "red", "pet": "cat"}
    ],
}
GREEDY = SamplingParams(max_tokens=160, temperature=0)


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "world.json"
    path.write_text(json.dumps(WORLD))
    return Toolbox(path)


@pytest.fixture(scope="module")
def scripts(toolbox):
    """CALC: one call, then the answer. TWO: text and two calls in one turn, a lookup and a call of a tool that does
    not exist (its error result is the toolbox's own text), then the answer. DIRECT: an answer without a call."""
    unknown = toolbox.run(ToolCall("weather", {"city": "Oxwick"}))
    assert json.loads(unknown).keys() == {"error"}
    two = Script(
        user("How old is Ada Brim?"),
        tuple(TOOLS),
        (
            "Let me look.\n"
            + call_text("lookup", {"name": "Ada Brim", "attribute": "age"})
            + "\n"
            + call_text("weather", {"city": "Oxwick"}),
            "Ada Brim is 27.",
        ),
        (observation_text(['{"name": "Ada Brim", "age": "27"}', unknown]),),
    )
    direct = Script(user("Who are you?"), tuple(TOOLS), ("I am MiniMind.",), ())
    return {"calc": with_tools(CALC, TOOLS), "two": two, "direct": direct}


@pytest.fixture(scope="module")
def model(scripts):
    return teach(list(scripts.values()))


def engine_for(model):
    return Engine(model, None, eos_id=2, max_batch=8)


def test_turns_and_observations_are_the_formats_tokens(model, scripts, toolbox, tokenizer):
    names = ["calc", "two", "direct"]
    engine = engine_for(model)
    convs = [list(scripts[k].messages) for k in names]
    results = run_agent(engine, tokenizer, convs, TOOLS, toolbox, GREEDY, max_turns=3)
    # All three first turns ran as one batch; then the two conversations with calls ran their second turns.
    assert engine.stats["largest_batch"] == 3 and engine.stats["requests_total"] == 5

    for name, res in zip(names, results):
        prompt, completion, mask = scripts[name].ids(tokenizer)
        assert res.prompt_ids == prompt
        assert res.completion_ids == completion, name
        assert res.model_mask == mask, name
        assert res.finished and res.stop_reason == "answer" and res.reply == res.answer
        # The id list is a tokenization of the recorded conversation as the template renders it (the final
        # "\n" after the last turn end is the template's, not the model's).
        text = tokenizer.decode(res.prompt_ids + res.completion_ids)
        assert text + "\n" == tokenizer.apply_chat_template(res.messages, tools=TOOLS)

    calc, two, direct = results
    assert (calc.turns, calc.tool_calls, calc.tool_errors, calc.answer) == (2, 1, 0, "37 + 48 = 85.")
    assert calc.calls == [
        {"turn": 1, "name": "calculator", "arguments": {"expression": "37 + 48"}, "result": '{"result": 85}',
         "error": False}
    ]  # fmt: skip
    assert calc.messages[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37 + 48"}}}]},
        {"role": "tool", "content": '{"result": 85}'},
        {"role": "assistant", "content": "37 + 48 = 85."},
    ]  # fmt: skip
    assert (two.turns, two.tool_calls, two.tool_errors, two.answer) == (2, 2, 1, "Ada Brim is 27.")
    assert [c["name"] for c in two.calls] == ["lookup", "weather"] and [c["error"] for c in two.calls] == [False, True]
    assert two.messages[1]["content"] == "Let me look." and [m["role"] for m in two.messages] == [
        "user", "assistant", "tool", "tool", "assistant"
    ]  # fmt: skip
    assert (direct.turns, direct.tool_calls, direct.answer, direct.completion_ids[-1]) == (1, 0, "I am MiniMind.", 2)


def test_the_observation_layout_token_by_token(scripts, toolbox, tokenizer):
    """observation_ids on its own: "\\n" after the turn end, the tool turn, the next assistant header."""
    messages = [*scripts["calc"].messages, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37 + 48"}}}]}]  # fmt: skip
    got = observation_ids(tokenizer, messages, [{"role": "tool", "content": '{"result": 85}'}], TOOLS)
    want = '\n<|im_start|>user\n<tool_response>\n{"result": 85}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    assert got == tokenizer.encode(want)
    assert got[1] == tokenizer.bos_id and tokenizer.eos_id in got and got[-1] == tokenizer.encode("\n")[-1]
    no_think = observation_ids(tokenizer, messages, [{"role": "tool", "content": "{}"}], TOOLS, enable_thinking=False)
    assert tokenizer.decode(no_think).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_max_turns_leaves_the_call_pending(model, scripts, toolbox, tokenizer):
    (res,) = run_agent(engine_for(model), tokenizer, [list(CALC.messages)], TOOLS, toolbox, GREEDY, max_turns=1)
    parts = scripts["calc"].parts(tokenizer)
    assert res.completion_ids == parts[1][1] and res.model_mask == [1] * len(parts[1][1])  # no observation after it
    assert not res.finished and res.stop_reason == "max_turns" and res.reply == "" and res.turns == 1
    assert res.tool_calls == 1 and res.messages[-1] == {"role": "tool", "content": '{"result": 85}'}


def test_a_turn_cut_before_its_end_runs_no_call(model, scripts, toolbox, tokenizer):
    cut = SamplingParams(max_tokens=10, temperature=0)
    (res,) = run_agent(engine_for(model), tokenizer, [list(CALC.messages)], TOOLS, toolbox, cut, max_turns=3)
    assert (
        res.completion_ids == scripts["calc"].parts(tokenizer)[1][1][:10] and tokenizer.eos_id not in res.completion_ids
    )
    assert not res.finished and res.stop_reason == "length" and res.calls == [] and res.turns == 1


def test_the_total_budget_bounds_turns_and_observations(model, scripts, toolbox, tokenizer):
    parts = scripts["calc"].parts(tokenizer)
    prompt, turn1, obs = (len(p[1]) for p in parts[:3])
    # Room for the first turn but not for its observation plus one token.
    limit = prompt + turn1 + obs
    (res,) = run_agent(engine_for(model), tokenizer, [list(CALC.messages)], TOOLS, toolbox, GREEDY, 3, None, limit)
    assert res.stop_reason == "context" and not res.finished and len(res.completion_ids) == turn1
    # Room for three tokens of the second turn: it is cut there, an answer without a call.
    (res,) = run_agent(engine_for(model), tokenizer, [list(CALC.messages)], TOOLS, toolbox, GREEDY, 3, None, limit + 3)
    assert len(res.prompt_ids) + len(res.completion_ids) == limit + 3
    assert res.finished and res.turns == 2 and res.answer == tokenizer.decode(parts[3][1][:3]).strip()
    with pytest.raises(AgentError, match="no room"):
        run_agent(engine_for(model), tokenizer, [list(CALC.messages)], TOOLS, toolbox, GREEDY, 3, None, prompt)


def test_sampled_turns_do_not_depend_on_the_batch(model, scripts, toolbox, tokenizer):
    convs = [list(scripts[k].messages) for k in ("calc", "two", "direct")]
    params = [SamplingParams(max_tokens=40, temperature=1.5, seed=s) for s in (11, 12, 13)]
    together = run_agent(engine_for(model), tokenizer, convs, TOOLS, toolbox, params, max_turns=3)
    for conv, p, res in zip(convs, params, together):
        (alone,) = run_agent(engine_for(model), tokenizer, [conv], TOOLS, toolbox, p, max_turns=3)
        assert (alone.completion_ids, alone.model_mask) == (res.completion_ids, res.model_mask)
    # Turn 0 samples with the seed itself: the first turn is the engine's answer to the prompt with that seed.
    first = engine_for(model).generate([together[0].prompt_ids], params[0])[0].output_ids
    assert together[0].completion_ids[: len(first)] == first


def test_refused_settings_and_templates(model, toolbox, tokenizer):
    conv = [list(CALC.messages)]
    with pytest.raises(ValueError, match="stop strings"):
        run_agent(engine_for(model), tokenizer, conv, TOOLS, toolbox, SamplingParams(stop=("x",)), 2)
    with pytest.raises(ValueError, match="max_turns"):
        run_agent(engine_for(model), tokenizer, conv, TOOLS, toolbox, GREEDY, 0)
    # A template that counts the messages in its system turn renders nothing earlier as a prefix of what follows.
    turns = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + (m.content or '') + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    counting = "{{ '<|im_start|>system\\n' ~ (messages | length) ~ '<|im_end|>\\n' }}" + turns
    assistant = {"role": "assistant", "content": "x"}
    tool = [{"role": "tool", "content": "{}"}]
    with pytest.raises(AgentError, match="prefix"):
        observation_ids(Tokenizer(tokenizer.hf, "counting", {"chat_template": counting}), [*CALC.messages, assistant],
                        tool, TOOLS)  # fmt: skip
    # A template that does not end an assistant turn with the turn-end token.
    unclosed = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' + m.content }}"
        "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(AgentError, match="does not close"):
        observation_ids(Tokenizer(tokenizer.hf, "unclosed", {"chat_template": unclosed}), [*CALC.messages, assistant],
                        tool, TOOLS)  # fmt: skip


def test_tools_from_messages():
    spec = SHORT_CALCULATOR
    system = {"role": "system", "content": "You can use tools."}
    assert tools_from_messages([{**system, "tools": json.dumps([spec])}, *CALC.messages]) == [spec]
    assert tools_from_messages([{**system, "tools": [spec]}]) == [spec]
    assert tools_from_messages([system]) is None and tools_from_messages(list(CALC.messages)) is None
    with pytest.raises(ValueError, match="not valid JSON"):
        tools_from_messages([{**system, "tools": "[{"}])
    with pytest.raises(ValueError, match="list of function specs"):
        tools_from_messages([{**system, "tools": {"name": "x"}}])
    with pytest.raises(ValueError, match='"name"'):
        tools_from_messages([{**system, "tools": [{"type": "function", "function": {"parameters": {}}}]}])
