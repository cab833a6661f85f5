"""train/rewards.py: the rule reward on the sample data, MiniMind's shaping terms by hand, a real (tiny, randomly
initialised) Hugging Face reward model saved to disk, and errors that must come before any training."""

import json
import math
from pathlib import Path

import pytest
import torch

from minimind_fast.tokenizer import render_chatml
from train import grpo, rewards

RLAIF = Path(__file__).resolve().parents[2] / "data" / "sample" / "rlaif.jsonl"


def test_every_sample_reference_reply_earns_the_rule_reward():
    records = [json.loads(line) for line in RLAIF.read_text().splitlines()]
    assert len(records) == 1100
    for rec in records:
        reply = rec["conversations"][-1]["content"]
        assert rewards.rule_reward("", reply, rec) == 1.0, (reply, rec["answer"])


@pytest.mark.parametrize(
    "answer, reply, reward",
    [
        ("27", "It is 26, 27 or 28.", 0.0),  # counted correct by held-out evaluation until both shared one matcher
        ("27", "Their age is 27.", 1.0),
        ("28", "71 - 43 = 128.", 0.0),
        ("28", "28th", 0.0),  # counted correct by the rule reward until both shared one matcher
        ("-5", "3 - 8 = -5", 1.0),
        ("red", "Her favourite colour is reddish.", 0.0),
        ("Heixmere", "She lives in heixmere", 1.0),
    ],
)
def test_rule_reward_and_heldout_evaluation_agree(answer, reply, reward):
    from minimind_fast.evaluate import answer_matches

    assert rewards.rule_reward("", reply, {"answer": answer}) == reward
    assert answer_matches(answer, reply) is (reward == 1.0)


def test_rule_reward_cases():
    sum_rec = {"answer": "34"}
    assert rewards.rule_reward("", "22 + 12 = 34.", sum_rec) == 1.0
    assert rewards.rule_reward("", "22 + 12 = 35.", sum_rec) == 0.0
    assert rewards.rule_reward("", "34? No: 22 + 12 = 33.", sum_rec) == 0.0  # judged by the last number
    assert rewards.rule_reward("", "It is 134.", sum_rec) == 0.0
    town = {"answer": "Myvvygate"}
    assert rewards.rule_reward("", "Her home town is myvvygate.", town) == 1.0  # case-insensitive whole word
    assert rewards.rule_reward("", "Her home town is Myvvygates.", town) == 0.0
    # Format asked for: the answer is read from the <answer> block and the exact format earns 0.5 more.
    good = "<think>\n22 plus 12 makes 34\n</think>\n<answer>\n34\n</answer>"
    assert rewards.rule_reward("", good, sum_rec, reasoning=True) == 1.5
    assert rewards.rule_reward("", "<think>\nsum is 34\n</think>\n<answer>\n33\n</answer>", sum_rec, True) == 0.5
    assert rewards.rule_reward("", "22 + 12 = 34.", sum_rec, reasoning=True) == 1.0  # right, but no format
    assert rewards.rule_reward("please use <think> tags", good, sum_rec) == 1.5  # the prompt asked for it
    with pytest.raises(rewards.RewardError, match="answer"):
        rewards.rule_reward("", "x", {"conversations": []})


def test_shaping_terms_by_hand():
    # 13 characters: outside [20, 800] -> -0.5; no </think>; no repeated trigram.
    assert rewards.shaping_reward("22 + 12 = 34.") == -0.5
    # "a b c a b c": tokens a b c a b c, trigrams abc bca cab abc -> 1 repeat of 4 -> min(0.5, 1 * 0.5 * 2 / 4) = 0.25
    assert rewards.repetition_penalty("a b c a b c") == 0.25
    assert rewards.repetition_penalty("a a a a a a a a") == 0.5  # capped
    assert rewards.repetition_penalty("a b") == 0.0
    thinking = "x" * 30
    reply = f"<think>\n{thinking}\n</think>\n<answer>\nthe answer is four\n</answer>"
    # length window +0.5; thinking 38 chars ("<think>\n" + 30 x) in [20, 300] -> +1.0; one </think> -> +0.25;
    # answer part "<answer>\nthe answer is four\n</answer>" has no repeated trigram.
    assert rewards.shaping_reward(reply) == pytest.approx(0.5 + 1.0 + 0.25)
    twice = f"<think>\nshort\n</think></think>{'y' * 30}"
    # length ok +0.5; thinking "<think>\nshort" is 13 chars -> -0.5; </think> twice -> -0.25
    assert rewards.shaping_reward(twice) == pytest.approx(0.5 - 0.5 - 0.25)
    lo, hi = rewards.reward_range(["shaping"])
    assert (lo, hi) == (-1.75, 1.75)
    assert rewards.reward_range(["rule", "model"], reasoning=True) == (-3.0, 4.5)


def test_reward_spec_parsing_and_sum():
    with pytest.raises(SystemExit, match="rule, shaping, model"):
        rewards.build_rewards("rule+speed")
    with pytest.raises(SystemExit, match="needs --reward_model_path"):
        rewards.build_rewards("rule+model")
    fn = rewards.build_rewards("rule+shaping")
    total, parts = fn(["", ""], ["22 + 12 = 34.", "nothing"], [{"answer": "34"}, {"answer": "34"}])
    torch.testing.assert_close(parts["rule"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(parts["shaping"], torch.tensor([-0.5, -0.5]))
    torch.testing.assert_close(total, torch.tensor([0.5, -0.5]))


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("reward_model")
    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=0,
        initializer_range=0.5,  # large random weights: scores that differ from text to text
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.mul_(1.5)  # some scores fall outside [-3, 3]
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def test_local_hf_reward_model_scores_in_batches_and_clamps(reward_model_dir, tokenizer):
    from transformers import LlamaForSequenceClassification

    prompts = [
        [{"role": "user", "content": "What is 22 + 12?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Ada live?"}],
    ]
    replies = ["34", "22 + 12 = 34, which is the sum.", "Ada lives in Myvvygate.", "", "no idea at all, sorry", "x"]
    convs = [prompts[i % 2] for i in range(len(replies))]
    scorer = rewards.RewardModel(reward_model_dir, batch_size=4)  # 6 texts: a full batch and a partial one
    got = scorer.score(convs, replies)

    # Independent reference: each text alone through the saved model, encoded with our own tokenizer.
    ref_model = LlamaForSequenceClassification.from_pretrained(reward_model_dir).eval()
    raw = []
    for conv, reply in zip(convs, replies):
        ids = tokenizer.encode(render_chatml([*conv, {"role": "assistant", "content": reply}]))
        with torch.no_grad():
            raw.append(float(ref_model(torch.tensor([ids])).logits[0, 0]))
    raw = torch.tensor(raw)
    assert (raw.abs() > 3).any() and (raw.abs() < 3).any()  # the case covers both sides of the clamp
    torch.testing.assert_close(got, raw.clamp(-3, 3), atol=1e-4, rtol=1e-4)

    # Through Rewards, from the data records (the final assistant turn is dropped from the prompt).
    fn = rewards.build_rewards("model", str(reward_model_dir), batch_size=3)
    recs = [{"conversations": [*c, {"role": "assistant", "content": "reference"}]} for c in convs]
    total, parts = fn([""] * len(replies), replies, recs)
    torch.testing.assert_close(total, raw.clamp(-3, 3), atol=1e-4, rtol=1e-4)
    assert math.isclose(float(parts["model"].max()), min(3.0, float(raw.max())), abs_tol=1e-4)


def test_bad_reward_model_path_fails_before_training(tmp_path, reward_model_dir):
    with pytest.raises(SystemExit, match="reward_model_path .*not a folder with a config.json"):
        rewards.build_rewards("model", str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot load"):
        rewards.build_rewards("model", str(broken))
    # The stage checks the reward before anything else: here even --from_weight does not exist, and the error is
    # about the reward model, and nothing was written.
    out = tmp_path / "out"
    argv = ["--reward", "rule+model", "--reward_model_path", str(tmp_path / "missing")]
    with pytest.raises(SystemExit, match="reward_model_path"):
        grpo.main(argv + ["--from_weight", str(tmp_path / "no_model"), "--out_dir", str(out), "--kernels", "torch"])
    assert not out.exists()


def test_reward_model_with_two_labels_is_refused(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=2,
        pad_token_id=0,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    with pytest.raises(SystemExit, match="num_labels=1"):
        rewards.build_rewards("model", str(tmp_path))
