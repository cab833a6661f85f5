"""Generation against references written here: a no-cache, no-padding greedy loop over the full sequence, per-prompt
runs, brute-force top-p sets, hand-computed penalty maths, and a tiny model trained to say a known sentence."""

import math

import pytest
import torch

from minimind_fast.config import from_preset
from minimind_fast.generate import (
    GenerationError,
    IncrementalDecoder,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    generate,
    generate_iter,
    process_logits,
    sample_tokens,
    stream_generate,
)
from minimind_fast.model import MiniMind

SENTENCE = "你好🙂世界 ok é"  # CJK and an emoji: byte-level tokens that split characters
OTHER_START, OTHER_LEN = 7, 26
OTHER_TEXT = "the tide comes in and the tide goes out over the sand and the stones, and the gulls call all day long"


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MiniMind(from_preset("tiny", num_hidden_layers=2)).eval()
    # Wider than the training init so the greedy path depends on the context instead of repeating one token.
    m.reset_parameters(std=0.1)
    return m


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """A one-layer model trained to continue [bos] with SENTENCE and then eos (id 2), and [OTHER_START] with
    OTHER_TEXT's first OTHER_LEN tokens and no eos. Returns (model, bos+SENTENCE+eos ids, OTHER_START+OTHER ids)."""
    torch.manual_seed(0)
    m = MiniMind(from_preset("tiny", num_hidden_layers=1, hidden_size=64, num_attention_heads=4))
    seq = [tokenizer.bos_id] + tokenizer.encode(SENTENCE) + [tokenizer.eos_id]
    other = [OTHER_START] + tokenizer.encode(OTHER_TEXT)[:OTHER_LEN]
    assert len(other) == OTHER_LEN + 1 > len(seq)
    x = torch.zeros(2, len(other), dtype=torch.long)
    x[0, : len(seq)], x[1] = torch.tensor(seq), torch.tensor(other)
    labels = x.clone()
    labels[0, len(seq) :] = -100
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(40):
        loss = m(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), seq, other


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 6400, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def reference_greedy(model, prompt, n, eos_id=None, penalty=1.0):
    """Recompute the whole unpadded sequence every step (no cache, no mask); CTRL penalty applied in float64."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1].double()
        if penalty != 1.0:
            seen = torch.tensor(sorted(set(seq)))
            v = logits[seen]
            logits[seen] = torch.where(v > 0, v / penalty, v * penalty)
        t = int(logits.argmax())
        out.append(t)
        seq.append(t)
        if t == eos_id:
            break
    return out


class CallCounter:
    """Counts forward calls and records the KV cache each call saw."""

    def __init__(self, model):
        self.calls, self.caches = 0, []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.caches.append(kwargs.get("kv_cache"))

    def remove(self):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("lengths", [(5,), (1, 6, 3, 9)], ids=["batch1", "batch4-mixed"])
def test_cached_greedy_equals_full_recompute(model, lengths):
    prompts = random_prompts(lengths)
    want = [reference_greedy(model, p, 10) for p in prompts]
    assert generate(model, prompts, 10, greedy=True, eos_id=None) == want
    assert generate(model, prompts, 10, temperature=0, eos_id=None, use_cache=False) == want


def test_batched_mixed_lengths_equal_each_prompt_alone(model):
    prompts = random_prompts((4, 1, 7, 2, 5))
    batched = generate(model, prompts, 8, greedy=True, eos_id=None)
    alone = [generate(model, [p], 8, greedy=True, eos_id=None)[0] for p in prompts]
    assert batched == alone
    assert all(len(o) == 8 for o in batched)


def test_repetition_penalty_in_generation_matches_reference(model):
    prompts = random_prompts((3, 6))
    want = [reference_greedy(model, p, 8, penalty=1.8) for p in prompts]
    got = generate(model, prompts, 8, greedy=True, repetition_penalty=1.8, eos_id=None)
    assert got == want


def test_eos_stops_its_row_and_the_others_go_on(memorised, tokenizer):
    m, seq, other = memorised
    answer = seq[1:]  # the sentence, then eos
    other_alone = generate(m, [other[:1]], OTHER_LEN, greedy=True)[0]
    assert other_alone == other[1:] and tokenizer.eos_id not in other_alone
    counter = CallCounter(m)
    try:
        out = generate(m, [[tokenizer.bos_id], other[:1]], OTHER_LEN, greedy=True, eos_id=tokenizer.eos_id)
    finally:
        counter.remove()
    assert len(answer) < OTHER_LEN
    assert out[0] == answer and out[0][-1] == tokenizer.eos_id
    assert out[1] == other_alone
    assert counter.calls == OTHER_LEN


def test_finished_rows_are_frozen_and_generation_stops_when_all_are_done(memorised, tokenizer):
    m, seq, _ = memorised
    answer = seq[1:]
    steps = []
    counter = CallCounter(m)
    try:
        out = generate(m, [[1], seq[:3]], 40, greedy=True, stream=steps.append)
    finally:
        counter.remove()
    assert out == [answer, seq[3:]]
    # The second row is two tokens ahead: it finishes first, then reports None while the first row goes on.
    assert len(steps) == len(answer) == counter.calls
    assert [s[1] for s in steps[len(seq) - 3 :]] == [None, None]


def test_max_new_tokens_and_exact_cache_size(model):
    prompts = random_prompts((2, 6, 4))
    counter = CallCounter(model)
    try:
        out = generate(model, prompts, 5, greedy=True, eos_id=None)
    finally:
        counter.remove()
    assert [len(o) for o in out] == [5, 5, 5]
    assert counter.calls == 5
    cache = counter.caches[0]
    assert all(c is cache for c in counter.caches)
    assert cache.max_len == 6 + 5 and cache.length == 6 + 4
    assert generate(model, prompts, 0) == [[], [], []]


def test_context_limit_is_a_clear_error():
    torch.manual_seed(0)
    m = MiniMind(from_preset("tiny", num_hidden_layers=1, max_position_embeddings=16)).eval()
    prompt = list(range(3, 13))
    with pytest.raises(GenerationError, match=r"10 tokens \+ max_new_tokens 7 = 17 > max_position_embeddings 16"):
        generate(m, [prompt], 7)
    assert len(generate(m, [prompt], 6, eos_id=None, seed=0)[0]) == 6


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[5, 7000]]), "outside"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_arguments_fail_with_a_reason(model, kw, msg):
    args = {"prompts": [[5, 6]], **kw}
    with pytest.raises(GenerationError, match=msg):
        generate(model, max_new_tokens=2, **args)


# ---------------------------------------------------------------------------------------------------------------
# Logits processors and sampling


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    present = torch.tensor([[True, True, False, False, True]])
    got = apply_repetition_penalty(logits, present, 2.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, -2.0, 0.5, -3.0, 2.0]]))


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, -4.0]])
    torch.testing.assert_close(apply_temperature(logits, 0.5), torch.tensor([[2.0, 4.0, -8.0]]))
    assert apply_temperature(logits, 1.0) is logits


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, 3.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    got = apply_top_k(logits, 3)
    kept = torch.isfinite(got)
    assert kept.sum(dim=1).tolist() == [3, 3]
    assert sorted(got[0][kept[0]].tolist()) == [3.0, 5.0, 5.0]
    assert kept[1].tolist() == [False, False, False, True, True, True]
    assert torch.equal(got[kept], logits[kept])
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 2
    for p in (0.05, 0.3, 0.5, 0.9, 0.99):
        kept = torch.isfinite(apply_top_p(logits, p))
        for row in range(logits.shape[0]):
            probs = logits[row].double().softmax(-1)
            order = probs.argsort(descending=True).tolist()
            total, size = 0.0, 0
            while total < p:
                total += float(probs[order[size]])
                size += 1
            assert set(torch.nonzero(kept[row]).flatten().tolist()) == set(order[:size]), (p, row)
    hand = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    assert torch.isfinite(apply_top_p(hand, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_top_p(hand, 0.85)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(apply_top_p(hand, 0.45)).tolist() == [[True, False, False, False]]
    # Exactly representable mass: four tokens at 0.25 reach p = 0.5 with two of them, not three.
    uniform = torch.zeros(1, 4)
    assert torch.isfinite(apply_top_p(uniform, 0.5)).sum() == 2
    assert torch.isfinite(apply_top_p(uniform, 0.75)).sum() == 3


def test_processors_apply_in_order_penalty_temperature_top_k_top_p():
    logits = torch.tensor([[3.0, 2.5, 1.0, -0.5, 0.2, 2.9]])
    present = torch.tensor([[True, False, False, True, False, False]])
    got = process_logits(logits, present, temperature=0.7, top_k=4, top_p=0.8, repetition_penalty=1.5)
    want = apply_top_p(apply_top_k(apply_temperature(apply_repetition_penalty(logits, present, 1.5), 0.7), 4), 0.8)
    torch.testing.assert_close(got, want)
    # By hand: penalty -> [2, 2.5, 1, -0.75, 0.2, 2.9]; top-4 keeps ids 5, 1, 0, 2; after /0.7 their probabilities
    # are about 0.53, 0.30, 0.15, 0.02, so top-p 0.8 keeps ids 5 and 1 (0.53 < 0.8 <= 0.83).
    assert torch.isfinite(got).tolist() == [[False, True, False, False, False, True]]


def test_sampling_frequencies_follow_the_processed_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0]]).expand(20000, 5)
    processed = process_logits(logits, temperature=0.8, top_k=4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_tokens(processed, g), minlength=5).double() / 20000
    want = torch.tensor([0.0, 1.0, 2.0, 0.5, -1.0]).double()
    want[4] = -math.inf  # the top-4 cut
    torch.testing.assert_close(counts, (want / 0.8).softmax(-1), atol=0.015, rtol=0)


def test_seeded_sampling_is_reproducible(model):
    prompts = random_prompts((3, 5, 2))
    kw = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1, eos_id=None)
    a = generate(model, prompts, 10, seed=7, **kw)
    assert generate(model, prompts, 10, seed=7, **kw) == a
    assert generate(model, prompts, 10, generator=torch.Generator().manual_seed(7), **kw) == a
    assert generate(model, prompts, 10, seed=8, **kw) != a


def test_sampling_respects_top_k_and_degenerates_to_greedy(model):
    prompt = random_prompts((4,))[0]
    greedy = reference_greedy(model, prompt, 6)
    assert generate(model, [prompt], 6, top_k=1, seed=0, eos_id=None)[0] == greedy
    assert generate(model, [prompt], 6, top_p=1e-6, seed=0, eos_id=None)[0] == greedy
    sampled = generate(model, [prompt], 6, temperature=1.5, top_k=5, seed=1, eos_id=None)[0]
    seq = list(prompt)
    with torch.no_grad():
        for t in sampled:
            top5 = model(torch.tensor([seq])).logits[0, -1].topk(5).indices.tolist()
            assert t in top5
            seq.append(t)


# ---------------------------------------------------------------------------------------------------------------
# Streaming


def test_incremental_decoder_holds_back_split_characters(tokenizer):
    ids = tokenizer.encode(SENTENCE)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the split this test is about
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == SENTENCE
    assert not any("\ufffd" in p for p in pieces)
    emoji = ids.index(tokenizer.encode("🙂")[0])
    assert pieces[emoji : emoji + 3] == ["", "", ""]


def test_stream_generate_spells_the_memorised_sentence(memorised, tokenizer):
    m, _, _ = memorised
    rows = [[tokenizer.bos_id], random_prompts((3,), seed=4)[0]]
    steps = list(stream_generate(m, tokenizer, rows, 30, greedy=True))
    first = [s[0] for s in steps]
    assert "".join(first) == SENTENCE
    assert not any("\ufffd" in p for p in first)
    assert "" in first  # tokens were held back mid-character
    full = generate(m, rows, 30, greedy=True)
    assert "".join(s[1] for s in steps) == tokenizer.decode(full[1], skip_special_tokens=True)


def test_stream_generate_concatenates_to_full_decode_when_sampling(model, tokenizer):
    prompts = random_prompts((2, 5, 3), seed=5)
    full = generate(model, prompts, 30, seed=11)
    texts = ["", "", ""]
    for deltas in stream_generate(model, tokenizer, prompts, 30, seed=11):
        texts = [t + d for t, d in zip(texts, deltas)]
    assert texts == [tokenizer.decode(o, skip_special_tokens=True) for o in full]


def test_generate_iter_yields_one_token_per_live_row(model):
    prompts = random_prompts((2, 4))
    steps = list(generate_iter(model, prompts, 4, greedy=True, eos_id=None))
    assert [[s[i] for s in steps] for i in range(2)] == generate(model, prompts, 4, greedy=True, eos_id=None)


# ---------------------------------------------------------------------------------------------------------------
# Compiled decode step


def test_compiled_decode_captures_one_graph_for_all_steps(model):
    """The dynamo capture on CPU with a recording backend (Inductor's C++ build takes about a minute on 2 CPU cores;
    the Inductor path itself is checked by the gpu test below)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    prompts = random_prompts((3, 6, 1))
    want = generate(model, prompts, 8, greedy=True, eos_id=None)
    assert generate(model, prompts, 8, greedy=True, eos_id=None, compile_decode=recording_backend) == want
    # One graph: no graph break, and no recompilation as the cache and the mask grow step by step.
    assert len(graphs) == 1


@pytest.mark.gpu
def test_compiled_decode_with_inductor_on_cuda_matches_eager():
    torch.manual_seed(0)
    m = MiniMind(from_preset("tiny", num_hidden_layers=2)).eval()
    m.reset_parameters(std=0.1)
    m = m.cuda()
    prompts = random_prompts((3, 9, 5, 1))
    want = generate(m, prompts, 24, greedy=True, eos_id=None)
    assert generate(m, prompts, 24, greedy=True, eos_id=None, compile_decode=True) == want
    assert generate(m, prompts, 24, greedy=True, eos_id=None, compile_decode=True) == want  # compiled code reused
