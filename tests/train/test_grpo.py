"""train/grpo.py end to end on CPU: a tiny policy on the sample RL prompts, checkpoints, exact resume, bad flags."""

import shutil

import pytest
import torch
from _stage_helpers import metric_rows

from minimind_fast import checkpoint as ckpt
from train import grpo

FAST = [
    "--kernels", "torch", "--batch_size", "2", "--num_generations", "4", "--max_gen_len", "8",
    "--max_seq_len", "40", "--reward", "rule+shaping", "--learning_rate", "1e-4",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_grpo_runs_saves_and_resumes_exactly(tmp_path, tiny_start):
    args = FAST + ["--from_weight", str(tiny_start), "--max_steps", "4", "--save_interval", "2", "--keep_last", "3"]
    full = tmp_path / "full"
    res = grpo.main(args + ["--out_dir", str(full)])
    m = metric_rows(full, "grpo")
    assert sorted(m) == [1, 2, 3, 4] and res["steps"] == 4
    for r in m.values():
        for key in ("reward", "reward_std", "reward_rule", "reward_shaping", "kl", "completion_len", "loss", "lr"):
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert r["clip_frac"] == 0.0  # one update per rollout: ratio 1, nothing clipped
        assert 1 <= r["completion_len"] <= 8
    assert m[1]["kl"] == 0.0 and m[4]["kl"] > 0.0  # the policy starts as the reference and moves away
    assert (full / "grpo_reward.png").stat().st_size > 1000
    model, cfg, payload = ckpt.load_model(full / "grpo")
    assert payload["args"]["num_generations"] == 4
    first = ckpt.load_model_state(tiny_start)
    assert any(not torch.equal(first[k], v) for k, v in model.state_dict().items() if k in first)

    # A run that "died" right after its step-2 checkpoint continues bit for bit (same prompts, same samples).
    cut = tmp_path / "cut"
    shutil.copytree(full / "grpo_resume" / "step_00000002", cut / "grpo_resume" / "step_00000002")
    grpo.main(args + ["--out_dir", str(cut), "--from_resume", "1"])
    got = metric_rows(cut, "grpo")
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert {k: v for k, v in got[s].items() if k != "seconds"} == {k: v for k, v in m[s].items() if k != "seconds"}
    a, b = ckpt.load_model_state(full / "grpo"), ckpt.load_model_state(cut / "grpo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_several_updates_per_rollout_clip(tmp_path, tiny_start):
    out = tmp_path / "mu"
    args = FAST + [
        "--from_weight",
        str(tiny_start),
        "--max_steps",
        "1",
        "--num_iterations",
        "3",
        "--learning_rate",
        "3e-3",
    ]
    grpo.main(args + ["--out_dir", str(out), "--epsilon", "0.05"])
    r = metric_rows(out, "grpo")[1]
    assert r["clip_frac"] > 0.0  # the later updates move the ratio out of [0.95, 1.05]


def test_grpo_bad_flags(tmp_path, tiny_start):
    with pytest.raises(SystemExit, match="num_generations"):
        grpo.main(FAST + ["--from_weight", str(tiny_start), "--num_generations", "1", "--out_dir", str(tmp_path / "o")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit, match='"answer"'):
        grpo.main(FAST + ["--from_weight", str(tiny_start), "--data_path", str(bad), "--out_dir", str(tmp_path / "o")])


def test_grpo_two_ranks_gather_rewards_and_average_gradients(tmp_path, tiny_start, rl_two_ranks, completion_logp):
    # Step 1 again by hand: rank r samples 4 completions of its own prompt with its own RNG. Premise: the rewards
    # differ within a group (the advantages are not all zero).
    out = tmp_path / "ranks"
    policy, ros = rl_two_ranks(
        "grpo.py", tiny_start, out, FAST, 4, 1, lambda ros: any(ro.rewards.std() > 0 for ro in ros)
    )
    m = metric_rows(out, "grpo")
    assert sorted(m) == [1, 2]
    rewards = torch.cat([ro.rewards for ro in ros])
    assert m[1]["reward"] == pytest.approx(rewards.mean().item(), abs=1e-5)
    assert m[1]["reward_std"] == pytest.approx(rewards.std(unbiased=False).item(), abs=1e-5)
    # Ratio 1 and KL 0 at step 1: the loss is -mean(A) = 0 within each group, and its gradient is
    # -mean_i A_i * mean_t grad log p_it, averaged over the two ranks.
    assert m[1]["loss"] == pytest.approx(0.0, abs=1e-6) and m[1]["kl"] == 0.0
    rank_losses = []
    for ro in ros:
        r = ro.rewards.view(-1, 4)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)
        mask = ro.completion_mask
        token_mean = (completion_logp(policy, ro) * mask).sum(1) / mask.sum(1)
        rank_losses.append(-(adv * token_mean).mean())
    ((rank_losses[0] + rank_losses[1]) / 2).backward()
    norm = torch.cat([p.grad.double().flatten() for p in policy.parameters() if p.grad is not None]).norm().item()
    assert m[1]["grad_norm"] == pytest.approx(norm, rel=1e-4, abs=1e-4)
    ckpt.load_model(out / "grpo")
    assert (out / "grpo_loss.png").stat().st_size > 1000 and (out / "grpo_reward.png").exists()
    state = ckpt.load_train_state(out / "grpo_resume" / "step_00000002")
    assert state["world_size"] == 2 and state["rows_seen"] == 4


def test_grpo_through_the_http_rollout_backend_equals_the_in_process_run(tmp_path, tiny_start):
    """--rollout_backend URL: tools/serve.py (started as users start it, --allow_weight_reload) samples the rollouts
    and receives the policy's weights before every step; with the same seeds it samples exactly what the in-process
    engine samples, so the run's metrics and final weights are the same bit for bit."""
    from tests.serve_cli import cli_server

    args = FAST + ["--from_weight", str(tiny_start), "--max_steps", "3", "--save_interval", "10"]
    grpo.main(args + ["--out_dir", str(tmp_path / "local")])
    with cli_server(tiny_start, "--allow_weight_reload") as base:
        spec = f"{base},sync_dir={tmp_path / 'sync'}"
        grpo.main(args + ["--out_dir", str(tmp_path / "http"), "--rollout_backend", spec])
        versions = sorted(p.name for p in (tmp_path / "sync").iterdir())
    local, http = metric_rows(tmp_path / "local", "grpo"), metric_rows(tmp_path / "http", "grpo")
    assert sorted(local) == sorted(http) == [1, 2, 3]
    for s in local:
        assert {k: v for k, v in local[s].items() if k != "seconds"} == {
            k: v for k, v in http[s].items() if k != "seconds"
        }
    assert local[3]["kl"] > 0.0  # the policy moved, so the server really generated with synced weights
    a, b = ckpt.load_model_state(tmp_path / "local" / "grpo"), ckpt.load_model_state(tmp_path / "http" / "grpo")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert versions, "no weights were written for the server"


def test_rollout_backend_url_is_checked(tmp_path, tiny_start, capsys):
    args = FAST + ["--from_weight", str(tiny_start), "--max_steps", "1", "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        grpo.main(args + ["--rollout_backend", "ftp://nowhere"])
    assert "--rollout_backend" in capsys.readouterr().err
