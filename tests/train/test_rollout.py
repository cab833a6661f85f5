"""train/rollout.py: masks through the first eos, the packed layout, log-probs that match the model's logits, the
first policy ratio exactly 1, rewards before any forward, and a left-padded batch equal to its prompts alone."""

import copy
from types import SimpleNamespace

import pytest
import torch

import minimind_kernels as kernels
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from train import rollout

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return MiniMind(from_preset("tiny"), ops=kernels.resolve("torch")).train()


def _zero_reward(prompts, replies, records):
    return torch.zeros(len(replies)), {}


def test_mask_through_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [9, 9, 2, 9]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    got = rollout.mask_through_first_eos(ids, valid, eos_id=2)
    # up to and including the first eos; without eos every generated token; an eos past the valid end is not one
    want = [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert got.tolist() == want


def test_pack_layout():
    p = rollout.pack([[1, 10, 11], [1, 12]], [[20, 2, 33], [21, 22, 23]], eos_id=2, pad_id=0)
    assert p["prompt_width"] == 3
    assert p["input_ids"].tolist() == [[1, 10, 11, 20, 2, 33], [0, 1, 12, 21, 22, 23]]
    assert p["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert p["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert p["position_ids"].tolist()[1] == [0, 0, 1, 2, 3, 4]  # rotary positions count real tokens only
    assert p["labels"].tolist() == [[-100, -100, -100, 20, 2, -100], [-100, -100, -100, 21, 22, 23]]


def _collect(policy, ref, prompts, reward_fn=_zero_reward, **kw):
    tok = kw.pop("tokenizer", SimpleNamespace(eos_id=2, pad_id=0, decode=lambda ids, skip_special_tokens: str(ids)))
    opts = dict(num_samples=2, max_new_tokens=6, device=torch.device("cpu"), forward_batch=3)
    opts.update(kw)
    return rollout.collect(
        policy, ref, prompts, ["p"] * len(prompts), [{}] * len(prompts), reward_fn, tok,
        generator=torch.Generator().manual_seed(1), **opts,
    )  # fmt: skip


def test_logp_matches_the_logits_and_first_ratio_is_exactly_one(policy):
    prompts = [[1, 300, 301, 302, 303], [1, 400, 401]]
    ro = _collect(policy, policy, prompts, with_old_logp=True)
    n, p_w = ro.input_ids.shape[0], ro.prompt_width
    assert n == 4 and ro.group.tolist() == [0, 0, 1, 1]
    # The training forward over the same chunks, with grad, reproduces the rollout's log-probs bit for bit.
    for sl in rollout.chunks(n, 3):
        logp, _ = rollout.forward_logp(policy, ro.rows(sl), p_w)
        assert logp.requires_grad
        ratio = torch.exp(logp - ro.old_logp[sl]) * ro.completion_mask[sl]
        assert torch.equal(ratio, ro.completion_mask[sl])
    # Independent check of the values: log_softmax of the full logits, row by row without padding.
    for i in range(n):
        real = ro.attention_mask[i].bool()
        ids = ro.input_ids[i][real][None]
        with torch.no_grad():
            logits = policy(ids).logits[0].float()
        k = int(ro.completion_mask[i].sum())
        comp = ids[0, -k:]
        want = logits.log_softmax(-1)[-k - 1 : -1].gather(1, comp[:, None])[:, 0]
        torch.testing.assert_close(ro.old_logp[i, :k], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ro.ref_logp[i, :k], want, atol=1e-5, rtol=1e-5)
        assert (ro.old_logp[i, k:] == 0).all()


def test_rewards_are_computed_before_the_policy_and_reference_forwards(policy):
    ref = copy.deepcopy(policy).eval()
    events = []

    def hook(name):
        def record(module, args, kwargs):
            if kwargs.get("labels") is not None:  # a log-prob forward (generation passes no labels)
                events.append(name)

        return record

    handles = [
        policy.register_forward_pre_hook(hook("policy"), with_kwargs=True),
        ref.register_forward_pre_hook(hook("ref"), with_kwargs=True),
    ]

    def reward_fn(prompts, replies, records):
        events.append("reward")
        return torch.ones(len(replies)), {}

    try:
        _collect(policy, ref, [[1, 300, 301], [1, 400]], reward_fn=reward_fn, with_old_logp=True)
    finally:
        for h in handles:
            h.remove()
    assert events[0] == "reward" and events.count("reward") == 1
    assert "policy" in events and "ref" in events


def test_completion_stops_at_the_first_eos(policy):
    prompt = [[1, 300, 301, 302]]
    free = _collect(policy, None, prompt, num_samples=1, temperature=0.0, max_new_tokens=6, with_old_logp=False)
    tokens = free.completion_ids[0].tolist()
    assert free.completion_mask[0].tolist() == [1.0] * 6
    # Declare the third greedy token the eos: generation must stop there and the mask must end with it.
    eos = tokens[2]
    first = tokens.index(eos)
    tok = SimpleNamespace(eos_id=eos, pad_id=0, decode=lambda ids, skip_special_tokens: str(ids))
    ro = _collect(policy, policy, prompt, num_samples=1, temperature=0.0, tokenizer=tok, with_old_logp=True)
    assert ro.completion_mask[0].tolist() == [1.0] * (first + 1)
    assert ro.completion_ids[0].tolist() == tokens[: first + 1]


def test_left_padded_batch_equals_each_prompt_alone(policy):
    prompts = [[1, 300, 301, 302, 303, 304, 305], [1, 400], [1, 500, 501, 502]]
    batch = _collect(policy, policy, prompts, num_samples=1, temperature=0.0, with_old_logp=True)
    for i, p in enumerate(prompts):
        alone = _collect(policy, policy, [p], num_samples=1, temperature=0.0, with_old_logp=True)
        k = int(alone.completion_mask[0].sum())
        assert int(batch.completion_mask[i].sum()) == k
        assert batch.completion_ids[i, :k].tolist() == alone.completion_ids[0, :k].tolist()
        torch.testing.assert_close(batch.old_logp[i, :k], alone.old_logp[0, :k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.ref_logp[i, :k], alone.ref_logp[0, :k], atol=1e-5, rtol=1e-5)
