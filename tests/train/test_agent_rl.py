"""Agentic RL (train/grpo.py --agent 1) on CPU: a tiny model taught to call the calculator, its multi-turn rollout
laid out token by token (prompt | model turn 1 | observation | model turn 2), the loss blind to observation tokens,
a short run that logs the tool statistics, an exact resume, and the defaults and flags of the mode."""

import json
import shutil

import pytest
import torch
from _stage_helpers import metric_rows

from minimind_fast import checkpoint as ckpt
from minimind_fast.evaluate import answer_matches
from minimind_fast.toolcall import Toolbox
from tests.minimind._agent_script import CALC, SHORT_CALCULATOR, Script, teach, user
from train import grpo, rewards, rollout
from train import losses as L

pytestmark = pytest.mark.usefixtures("one_thread_module")

SYSTEM = {"role": "system", "content": "You can use tools.", "tools": json.dumps([SHORT_CALCULATOR])}
RECORDS = [
    {"conversations": [SYSTEM, *CALC.messages], "answer": "85"},
    {"conversations": [SYSTEM, *user("Who are you?")], "answer": "MiniMind"},
]
WORLD = {
    "world": "Kethmar",
    "people": [
        {"name": "Ada Brim", "age": "27", "town": "Oxwick", "profession": "baker", "colour": "red", "pet": "cat"}
    ],
}
SCRIPTS = [
    Script((SYSTEM, *CALC.messages), (SHORT_CALCULATOR,), CALC.turns, CALC.observations),
    Script((SYSTEM, *user("Who are you?")), (SHORT_CALCULATOR,), ("I am MiniMind.",), ()),
]
FAST = [
    "--agent", "1", "--kernels", "torch", "--batch_size", "2", "--num_generations", "2", "--max_gen_len", "64",
    "--max_turns", "3", "--reward", "rule+shaping", "--learning_rate", "1e-3", "--max_seq_len", "400",
    "--temperature", "1.0",
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("agent_rl")
    model = teach(SCRIPTS)
    start = ckpt.save_checkpoint(root / "tool_sft", model, model.config, tokenizer)
    data = root / "rl_tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 4))
    world = root / "world.json"
    world.write_text(json.dumps(WORLD))
    return {"root": root, "start": start, "data": data, "world": world, "model": model}


def greedy_rollout(model, tokenizer, world):
    reward_fn = rewards.build_rewards("rule")
    convs = [r["conversations"] for r in RECORDS]
    texts = [tokenizer.apply_chat_template(c, tools=[SHORT_CALCULATOR], add_generation_prompt=True) for c in convs]
    return rollout.agent_collect(
        model, model, convs, [[SHORT_CALCULATOR]] * 2, texts, RECORDS, reward_fn, tokenizer, Toolbox(world),
        num_samples=1, max_new_tokens=64, max_turns=3, device=torch.device("cpu"), temperature=0.0,
    )  # fmt: skip


def test_rollout_layout_token_by_token(files, tokenizer):
    ro = greedy_rollout(files["model"], tokenizer, files["world"])
    parts = [s.parts(tokenizer) for s in SCRIPTS]
    assert [k for k, _ in parts[0]] == ["prompt", "model", "observation", "model"]
    p_w = max(len(p[0][1]) for p in parts)
    r_w = max(sum(len(ids) for _, ids in p[1:]) for p in parts)
    assert ro.prompt_width == p_w and ro.input_ids.shape == (2, p_w + r_w)
    for i, p in enumerate(parts):
        prompt = p[0][1]
        pad = p_w - len(prompt)
        want_ids, want_mask = [], []
        for kind, ids in p[1:]:
            want_ids += ids
            want_mask += [1.0 if kind == "model" else 0.0] * len(ids)
        right = r_w - len(want_ids)
        assert ro.input_ids[i].tolist() == [0] * pad + prompt + want_ids + [0] * right
        assert ro.attention_mask[i].tolist() == [0] * pad + [1] * (len(prompt) + len(want_ids)) + [0] * right
        assert ro.position_ids[i, pad : pad + len(prompt) + len(want_ids)].tolist() == list(
            range(len(prompt) + len(want_ids))
        )
        assert ro.completion_mask[i].tolist() == want_mask + [0.0] * right
        labels = [t if m else -100 for t, m in zip(want_ids, want_mask)]
        assert ro.labels[i].tolist() == [-100] * p_w + labels + [-100] * right
        # Every turn's turn-end token is the model's to learn.
        assert [t for t, m in zip(want_ids, want_mask) if m].count(tokenizer.eos_id) == len(SCRIPTS[i].turns)
    assert ro.rewards.tolist() == [1.0, 1.0] and ro.completions == ["37 + 48 = 85.", "I am MiniMind."]
    assert answer_matches("85", ro.completions[0]) and answer_matches("MiniMind", ro.completions[1])
    assert {k: v.tolist() for k, v in ro.agent.items()} == {
        "tool_calls": [1.0, 0.0], "tool_errors": [0.0, 0.0], "unfinished": [0.0, 0.0], "turns": [2.0, 1.0]
    }  # fmt: skip
    assert ro.lengths.tolist() == [sum(len(ids) for k, ids in p[1:] if k == "model") for p in parts]
    # The reference log-probs (the policy itself here) are 0 on observation and pad columns.
    assert (ro.ref_logp[ro.completion_mask == 0] == 0).all() and (ro.ref_logp[ro.completion_mask == 1] < 0).all()


def test_the_loss_never_reaches_observation_tokens(files, tokenizer):
    """The GRPO loss (grpo.train_on_rollout's: losses.grpo_loss over forward_logp) differentiated down to the logits:
    zero gradient at every position whose next token is an observation token, non-zero where it is a model token;
    and the same parameter gradient as the loss written from the full logits with the layout's own mask."""
    model = files["model"]
    ro = greedy_rollout(model, tokenizer, files["world"])
    p = ro.prompt_width
    adv = torch.tensor([1.0, -1.0])

    out = model(ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids, return_logits=True)
    logits = out.logits
    logits.retain_grad()
    full_logp = logits[:, p - 1 : -1].log_softmax(-1).gather(2, ro.input_ids[:, p:, None])[..., 0]
    loss = L.grpo_loss(full_logp, full_logp.detach(), ro.ref_logp, adv, ro.completion_mask)
    model.zero_grad()
    loss.backward()
    grad_at = logits.grad[:, p - 1 : -1].abs().sum(-1)  # position t's logits predict completion column t - p + 1
    real = ro.attention_mask[:, p:].bool()
    obs = real & (ro.completion_mask == 0)
    assert obs.sum() == len(SCRIPTS[0].parts(tokenizer)[2][1])  # the one observation of row 0
    assert (grad_at[obs] == 0).all() and (grad_at[ro.completion_mask == 1] > 0).all()
    want = {n: q.grad.clone() for n, q in model.named_parameters()}

    model.zero_grad()
    logp, _ = rollout.forward_logp(model, ro.rows(slice(None)), p)
    assert (logp[obs] == 0).all()
    torch.testing.assert_close(logp[ro.completion_mask == 1], full_logp.detach()[ro.completion_mask == 1])
    L.grpo_loss(logp, logp.detach(), ro.ref_logp, adv, ro.completion_mask).backward()
    for n, q in model.named_parameters():
        torch.testing.assert_close(q.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
    model.zero_grad()


def test_agent_grpo_runs_logs_tools_and_resumes_exactly(files, tmp_path):
    args = FAST + ["--from_weight", str(files["start"]), "--data_path", str(files["data"]), "--world",
                   str(files["world"]), "--max_steps", "4", "--save_interval", "2", "--keep_last", "3"]  # fmt: skip
    full = tmp_path / "full"
    res = grpo.main(args + ["--out_dir", str(full)])
    m = metric_rows(full, "grpo")
    assert sorted(m) == [1, 2, 3, 4] and res["steps"] == 4
    for r in m.values():
        for key in ("reward", "reward_rule", "reward_shaping", "kl", "loss", "completion_len"):
            assert r[key] == r[key], key
        # 4 rollouts per step, each 1 to 3 turns; a call is made only in a turn, an error only with a call.
        assert 0 <= r["tool_errors"] <= r["tool_calls"] <= 3 and 1 <= r["turns"] <= 3 and 0 <= r["unfinished"] <= 1
        assert r["tool_calls"] * 4 == round(r["tool_calls"] * 4) and r["unfinished"] * 4 == round(r["unfinished"] * 4)
    assert m[1]["kl"] == 0.0 and m[4]["kl"] > 0.0  # the policy starts as the reference and moves away
    assert any(r["tool_calls"] > 0 for r in m.values())  # the taught model calls the calculator
    model, _, payload = ckpt.load_model(full / "grpo")
    assert payload["args"]["agent"] == 1 and payload["args"]["max_turns"] == 3

    cut = tmp_path / "cut"
    shutil.copytree(full / "grpo_resume" / "step_00000002", cut / "grpo_resume" / "step_00000002")
    grpo.main(args + ["--out_dir", str(cut), "--from_resume", "1"])
    got = metric_rows(cut, "grpo")
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert {k: v for k, v in got[s].items() if k != "seconds"} == {k: v for k, v in m[s].items() if k != "seconds"}
    a, b = ckpt.load_model_state(full / "grpo"), ckpt.load_model_state(cut / "grpo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_defaults_follow_the_mode(tmp_path):
    plain, agentic = grpo.Args(out_dir=str(tmp_path)), grpo.Args(agent=1, out_dir=str(tmp_path))
    assert (plain.data_path, plain.from_weight, plain.max_seq_len) == ("data/sample/rlaif.jsonl", "out/full_sft", 66)
    assert plain.max_gen_len is None  # the machine's default, filled in later (48 on CPU, 1536 on CUDA)
    assert (agentic.data_path, agentic.from_weight, agentic.max_seq_len, agentic.max_gen_len) == (
        "data/sample/rl_tools.jsonl", "out/tool_sft", 1024, 96
    )  # fmt: skip
    (tmp_path / "tool_sft").mkdir()
    assert grpo.Args(agent=1, out_dir=str(tmp_path)).from_weight == str(tmp_path / "tool_sft")
    given = grpo.Args(agent=1, out_dir=str(tmp_path), from_weight="out/full_sft", data_path="x.jsonl", max_seq_len=9)
    assert (given.from_weight, given.data_path, given.max_seq_len) == ("out/full_sft", "x.jsonl", 9)


def test_bad_agent_settings_stop_with_one_line(files, tmp_path, capsys):
    base = FAST + ["--from_weight", str(files["start"]), "--data_path", str(files["data"]), "--out_dir",
                   str(tmp_path / "o")]  # fmt: skip
    bad_world = tmp_path / "world.json"
    bad_world.write_text('{"world": "Kethmar", "people": [{"name": "A"}]}')
    with pytest.raises(SystemExit, match="--world"):
        grpo.main(base + ["--world", str(bad_world)])
    with pytest.raises(SystemExit, match="--max_turns 0"):
        grpo.main(base + ["--world", "none", "--max_turns", "0"])
    with pytest.raises(SystemExit, match=r"rl_tools.jsonl:\d+: the prompt with its tools is \d+ tokens"):
        grpo.main(base + ["--world", "none", "--max_seq_len", "50"])


def test_agent_grpo_on_two_ranks_logs_the_mean_of_both_ranks_rollouts(files, tmp_path, torchrun, tokenizer):
    """torchrun, 2 ranks, one step of one prompt x 2 rollouts per rank: rank r rolls out prompt r of the epoch order
    with its own RNG (rollout number r). The logged reward, tool calls and turns are the means over both ranks'
    rollouts, recomputed here in one process from the same checkpoint."""
    from minimind_fast.data import RLPromptDataset

    out = tmp_path / "ddp"
    flags = list(FAST)
    flags[flags.index("--batch_size") + 1] = "1"
    torchrun("grpo.py", flags + ["--from_weight", files["start"], "--data_path", files["data"], "--world",
                                 files["world"], "--max_steps", "1", "--out_dir", out, "--seed", "42"])  # fmt: skip
    got = metric_rows(out, "grpo")[1]

    policy, _, _ = ckpt.load_model(files["start"])
    data = RLPromptDataset(str(files["data"]), tokenizer, 400)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(42 * 1_000_003))
    box = Toolbox(files["world"])
    reward_fn = rewards.build_rewards("rule+shaping")
    ros = []
    for r in (0, 1):
        b = rollout.agent_prompt_batch(data, order, r, 1, tokenizer, box, 400)
        ros.append(
            rollout.agent_collect(
                policy,
                None,
                b["conversations"],
                b["tools"],
                b["texts"],
                b["records"],
                reward_fn,
                tokenizer,
                box,
                num_samples=2,
                max_new_tokens=64,
                max_turns=3,
                device=torch.device("cpu"),
                temperature=1.0,
                with_old_logp=False,
                generator=rollout.rollout_generator(torch.device("cpu"), 42, r),
            )  # fmt: skip
        )
    rewards_all = torch.cat([ro.rewards for ro in ros])
    assert got["reward"] == pytest.approx(float(rewards_all.mean()), abs=1e-4)
    for key in ("tool_calls", "turns"):
        assert got[key] == pytest.approx(float(torch.cat([ro.agent[key] for ro in ros]).mean()), abs=1e-4), key
