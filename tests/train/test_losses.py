"""train/losses.py against hand-computed cases (plain Python math) and against the unchunked definitions."""

import math
import re

import pytest
import torch

from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from train.losses import chunked_distill_kl, distill_kl, dpo_loss, sequence_logp, tag_weights


def _log1p_exp(x):
    """-log sigmoid(-x) = log(1 + e^x), in plain Python."""
    return math.log(1.0 + math.exp(x))


# --------------------------------------------------------------------------------------------------------------- DPO
def test_dpo_sequence_logp_sums_or_averages_labelled_tokens_only():
    nll = torch.tensor([[7.0, 0.5, 1.0, 2.0], [7.0, 0.25, 9.0, 9.0]])
    labels = torch.tensor([[-100, 5, 6, 7], [-100, 5, -100, -100]])
    assert sequence_logp(nll, labels).tolist() == [-3.5, -0.25]
    assert sequence_logp(nll, labels, mean=True).tolist() == pytest.approx([-3.5 / 3, -0.25])
    # A row with no labelled token scores 0 either way (no division by zero).
    empty = torch.full((1, 4), -100)
    assert sequence_logp(nll[:1], empty, mean=True).tolist() == [0.0]


def test_dpo_loss_rewards_and_accuracy_by_hand():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    beta = 0.1
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: (pc - pr) - (rc - rr) = 1 - 0 = 1; pair 1: -2 - 0 = -2.
    want = (_log1p_exp(-0.1 * 1.0) + _log1p_exp(-0.1 * -2.0)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert cr.tolist() == pytest.approx([0.1 * 0.5, 0.1 * -1.0])
    assert rj.tolist() == pytest.approx([0.1 * -0.5, 0.1 * 1.0])
    assert (cr > rj).tolist() == [True, False]  # the accuracy the stage logs
    assert (cr - rj).tolist() == pytest.approx([0.1, -0.2])  # margins = beta * logits


def test_dpo_loss_gradient_by_hand():
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    beta = 0.5
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    loss.backward()
    # d/dz of mean_b log(1 + exp(-beta z_b)) = -beta * sigmoid(-beta z_b) / B, with z = [1, -2].
    want = [-beta / (1 + math.exp(beta * z)) / 2 for z in (1.0, -2.0)]
    assert pc.grad.tolist() == pytest.approx(want, rel=1e-6)
    assert pr.grad.tolist() == pytest.approx([-w for w in want], rel=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    lp = torch.tensor([-4.0, -2.0, -7.0])
    loss, cr, rj = dpo_loss(lp, lp - 1, lp, lp - 1, 0.1)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert cr.abs().max() == 0 and rj.abs().max() == 0


# ------------------------------------------------------------------------------------------------------ distillation
def test_distill_kl_by_hand():
    s = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [3.0, -2.0, 0.0]]
    t = [[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [9.0, 9.0, 9.0]]
    temp = 1.5

    def softmax(row):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    kls = [kl(softmax(ti), softmax(si)) for si, ti in zip(s, t)]
    mask = torch.tensor([True, True, False])
    got = distill_kl(torch.tensor(s), torch.tensor(t), temp, mask)
    assert got.item() == pytest.approx((kls[0] + kls[1]) / 2, rel=1e-5)
    assert distill_kl(torch.tensor(s), torch.tensor(t), temp).item() == pytest.approx(sum(kls) / 3, rel=1e-5)


def _heads(n, v, ds, dt, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64, requires_grad=True)
    return hs, ws, ht, wt


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("masked", [True, False])
def test_distill_chunked_kl_equals_unchunked_value_and_gradient(chunk, masked):
    n, v = 37, 53  # odd sizes: partial last chunk
    hs, ws, ht, wt = _heads(n, v, ds=8, dt=12)
    mask = (torch.arange(n) % 3 != 0) if masked else None
    want = distill_kl(hs @ ws.t(), ht @ wt.t(), 1.5, mask)
    g_want = torch.autograd.grad(want, (hs, ws))
    got = chunked_distill_kl(hs, ws, ht, wt, 1.5, mask, chunk_size=chunk)
    g_got = torch.autograd.grad(got, (hs, ws))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if masked:  # rows outside the mask get exactly no gradient
        assert g_got[0][~mask].abs().max() == 0


def test_distill_chunked_kl_fp32_close_to_fp64_truth_and_teacher_untouched():
    hs, ws, ht, wt = _heads(20, 31, ds=6, dt=6, seed=1)
    truth = distill_kl(hs @ ws.t(), ht @ wt.t(), 2.0)
    h32, w32 = hs.detach().float().requires_grad_(), ws.detach().float().requires_grad_()
    got = chunked_distill_kl(h32, w32, ht.detach().float(), wt.detach().float(), 2.0, chunk_size=7)
    got.backward()
    assert got.item() == pytest.approx(truth.item(), rel=1e-5)
    g_truth = torch.autograd.grad(truth, hs)[0]
    torch.testing.assert_close(h32.grad.double(), g_truth, rtol=1e-4, atol=1e-6)
    assert ht.grad is None and wt.grad is None


def test_distill_chunked_kl_empty_mask_and_vocab_mismatch():
    hs, ws, ht, wt = _heads(4, 9, ds=4, dt=4)
    zero = chunked_distill_kl(hs, ws, ht, wt, 1.0, torch.zeros(4, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and hs.grad.abs().max() == 0
    with pytest.raises(ValueError, match="vocabularies differ"):
        chunked_distill_kl(hs, ws, ht, wt[:5], 1.0)


# --------------------------------------------------------------------------------------------- weighted tag tokens
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def test_weighted_tag_weights_hit_exactly_the_tag_tokens(tokenizer):
    # Stray '<' and '>' in the text, a tag glued to a word, and an unclosed "<think" that must stay at weight 1.
    text = "Is 3<4 > 2?\n<think>\nx < y and y > z\n</think>\n<answer>\nok<think\n</answer>x<answer>y"
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    ids = torch.tensor([enc.ids])
    # Independent truth from characters: a token is a tag token when its characters lie inside a tag occurrence.
    spans = [(m.start(), m.end()) for m in re.finditer("|".join(re.escape(t) for t in TAGS), text)]
    assert len(spans) == 5
    want = [10.0 if any(a <= s and e <= b for a, b in spans) else 1.0 for s, e in enc.offsets]
    seqs = [tokenizer.encode(t) for t in TAGS]
    got = tag_weights(ids, seqs, 10.0)
    assert got.dtype == torch.float32 and got[0].tolist() == want
    lt = tokenizer.encode("<")[0]
    stray = [i for i, (tok, w) in enumerate(zip(enc.ids, want)) if tok == lt and w == 1.0]
    assert len(stray) >= 3  # '<' outside a tag occurs and is not weighted (MiniMind's id test would weigh it)
    assert sum(w == 10.0 for w in want) == sum(len(tokenizer.encode(text[a:b])) for a, b in spans)


def test_weighted_tag_weights_skip_ignored_labels_and_batch_rows(tokenizer):
    seq = tokenizer.encode("<think>")
    row = torch.tensor([5] + seq + [6] + seq)
    labels = torch.stack([row, row.clone()])
    labels[1, 1 : 1 + len(seq)] = -100  # the first tag of row 1 is outside the loss (e.g. in a prompt)
    w = tag_weights(labels, [seq], 3.0)
    k = len(seq)
    assert w[0].tolist() == [1.0] + [3.0] * k + [1.0] + [3.0] * k
    assert w[1].tolist() == [1.0] + [1.0] * k + [1.0] + [3.0] * k


def test_weighted_loss_is_weighted_sum_over_trained_label_count(tokenizer):
    """token_weight through the model: mean = sum(w * nll) / (number of non-ignored labels), as MiniMind's
    reasoning loss; the per-token NLL is checked against a full log-softmax."""
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", hidden_size=64, num_hidden_layers=1, num_attention_heads=4)).double()
    ids = torch.tensor([[1] + tokenizer.encode("hi <think>\nx\n</think>\n<answer>\n2\n</answer>") + [2]])
    labels = ids.clone()
    labels[0, :3] = -100
    w = tag_weights(labels, [tokenizer.encode(t) for t in TAGS], 10.0)
    got = model(ids, labels=labels, token_weight=w).loss
    logp = model(ids, return_logits=True).logits[0, :-1].log_softmax(-1)
    tgt = labels[0, 1:]
    keep = tgt != -100
    nll = -logp[keep].gather(1, tgt[keep][:, None])[:, 0]
    want = (nll * w[0, 1:][keep]).sum() / keep.sum()
    assert int((w > 1).sum()) == 12  # four tags of three tokens each
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
