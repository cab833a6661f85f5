"""The inference engine against generate() run on each prompt alone: requests join and leave a running batch (dense
and MoE, greedy and seeded sampling, repetition penalty, top-k/top-p), and every request's tokens stay exactly those
of its lone run. Also: the cache budget, cancellation, stop strings, the worker thread with sinks, request errors."""

import threading
from dataclasses import replace

import pytest
import torch

from minimind_fast.config import from_preset
from minimind_fast.engine import Engine, QueueFull, RequestError, SamplingParams
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind, RowKVCache

pytestmark = pytest.mark.usefixtures("one_thread_module")
CONTEXT = 256


def random_model(moe: bool = False) -> MiniMind:
    torch.manual_seed(0)
    cfg = from_preset("tiny", num_hidden_layers=2, max_position_embeddings=CONTEXT, use_moe=moe)
    m = MiniMind(cfg)
    m.reset_parameters(std=0.1)  # context-dependent greedy answers
    return m.eval()


@pytest.fixture(scope="module")
def dense():
    return random_model(False)


def alone(model, tokenizer, prompt, sp: SamplingParams) -> list[int]:
    """What generate() gives this request run by itself (eos ends it unless ignored; max_tokens caps it)."""
    return generate(
        model,
        [prompt],
        sp.max_tokens,
        greedy=sp.greedy,
        temperature=1.0 if sp.greedy else sp.temperature,
        top_k=sp.top_k,
        top_p=sp.top_p,
        repetition_penalty=sp.repetition_penalty,
        seed=sp.seed,
        eos_id=None if sp.ignore_eos else tokenizer.eos_id,
    )[0]


def mixed_requests(tokenizer, n: int):
    """Prompts of different lengths, answers of different lengths, every sampling setting in the mix."""
    out = []
    for i in range(n):
        prompt = tokenizer.encode(f"Question {i}: " + "tell me more " * (i % 5))
        sp = SamplingParams(
            max_tokens=4 + 9 * (i % 4),
            temperature=0.0 if i % 3 == 0 else 0.8 + 0.1 * (i % 2),
            top_k=0 if i % 4 else 40,
            top_p=0.9 if i % 2 else 1.0,
            repetition_penalty=1.3 if i % 5 == 1 else 1.0,
            seed=None if i % 3 == 0 else 1000 + i,
            ignore_eos=True,
        )
        out.append((prompt, sp))
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_requests_joining_a_running_batch_get_their_lone_answers(moe, tokenizer):
    model = random_model(moe)
    engine = Engine(model, tokenizer, max_batch=4)
    reqs, joined_running = [], 0
    for prompt, sp in mixed_requests(tokenizer, 12):
        running_before = engine.metrics()["requests_running"]
        reqs.append(engine.submit(prompt, sp))
        engine.step()  # the new request is prefilled and joins whoever is running
        joined_running += running_before > 0 and reqs[-1].status == "running"
        engine.step()
    while not all(r.finished for r in reqs):
        engine.step()
    m = engine.metrics()
    assert m["largest_batch"] == 4 and joined_running >= 3  # requests joined batches that were mid-generation
    assert m["requests_finished"] == 12 and m["requests_running"] == 0
    for r in reqs:
        assert r.finish_reason == "length"
        assert r.output_ids == alone(model, tokenizer, r.prompt_ids, r.params), r.params
        assert r.content == tokenizer.decode(r.output_ids, skip_special_tokens=True)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_everything_submitted_at_once_with_a_growing_cache(moe, tokenizer):
    # Prompts of mixed lengths prefilled together, right-padded. Short requests first: the cache is allocated
    # narrow, then widened (rows copied) when a long one joins.
    reqs = [(tokenizer.encode("hi"), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))] * 2
    reqs += [
        (tokenizer.encode("a longer question " * 6), SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
    ]
    reqs += mixed_requests(tokenizer, 5)
    model = random_model(moe)
    engine = Engine(model, tokenizer)
    first = engine.submit(*reqs[0])
    engine.step()
    width0 = engine._cache.max_len
    done = engine.generate([p for p, _ in reqs[1:]], [sp for _, sp in reqs[1:]])
    while not first.finished:
        engine.step()
    assert engine._cache.max_len > width0
    for r in [first, *done]:
        assert r.output_ids == alone(model, tokenizer, r.prompt_ids, r.params)


def test_token_ids_only_without_a_tokenizer(dense, tokenizer):
    """Rollouts need ids, not text: with no tokenizer the engine stops on the eos id it is given, or max_tokens."""
    prompt = tokenizer.encode("ids only")
    sp = SamplingParams(max_tokens=12, temperature=0)
    full = alone(dense, tokenizer, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    engine = Engine(dense, None, eos_id=full[4])
    r = engine.generate([prompt], sp)[0]
    assert r.output_ids == full[: full.index(full[4]) + 1] and r.finish_reason == "stop" and r.content == ""
    r = Engine(dense, None).generate([prompt], sp)[0]
    assert r.output_ids == full and r.finish_reason == "length"


def test_the_cache_budget_limits_the_batch(dense, tokenizer):
    prompt = tokenizer.encode("budget")
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    need = len(prompt) + sp.max_tokens
    engine = Engine(dense, tokenizer, max_batch=8, max_batch_tokens=3 * need)
    done = engine.generate([prompt] * 7, sp)
    assert engine.metrics()["largest_batch"] == 3
    want = alone(dense, tokenizer, prompt, sp)
    assert all(r.output_ids == want for r in done)


def test_cancel_a_running_row_and_a_queued_one(dense, tokenizer):
    engine = Engine(dense, tokenizer, max_batch=2)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    a, b, c = (engine.submit(tokenizer.encode(t), sp) for t in ("first", "second", "third"))
    for _ in range(5):
        engine.step()
    assert c.status == "queued"
    engine.cancel(c)
    n = len(a.output_ids)
    engine.cancel(a)
    engine.step()
    assert a.status == "cancelled" and len(a.output_ids) == n  # it left before the next step
    assert c.status == "cancelled" and c.output_ids == []
    while not b.finished:
        engine.step()
    assert b.output_ids == alone(dense, tokenizer, b.prompt_ids, sp)
    m = engine.metrics()
    assert m["requests_cancelled"] == 2 and m["requests_finished"] == 1 and m["requests_active"] == 0


def test_stop_strings_end_a_row_and_cut_its_text(dense, tokenizer):
    prompt = tokenizer.encode("stop here")
    full = alone(dense, tokenizer, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    text = tokenizer.decode(full, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and text.find(stop) > 0
    engine = Engine(dense, tokenizer)
    other = engine.submit(tokenizer.encode("a neighbour"), SamplingParams(max_tokens=30, temperature=0))
    r = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    assert r.finish_reason == "stop" and r.content == text[: text.find(stop)]
    assert len(r.output_ids) < len(full) and r.output_ids == full[: len(r.output_ids)]
    while not other.finished:
        engine.step()


def test_worker_thread_with_sinks_from_many_threads(dense, tokenizer):
    engine = Engine(dense, tokenizer, max_batch=5)
    engine.start()
    requests = mixed_requests(tokenizer, 10)
    events: list[list[dict]] = [[] for _ in requests]
    reqs = [None] * len(requests)

    def client(i):
        prompt, sp = requests[i]
        reqs[i] = engine.submit(prompt, sp, sink=events[i].append)
        reqs[i].wait(60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.stop()
    assert not engine.alive
    for r, ev in zip(reqs, events):
        assert r.finished and r.output_ids == alone(dense, tokenizer, r.prompt_ids, r.params)
        deltas = [e for e in ev if e["type"] == "delta"]
        assert "".join(e["content"] for e in deltas) == r.content
        assert ev[-1] == {"type": "done", "finish_reason": "length", "usage": r.usage()}
        assert r.usage()["completion_tokens"] == r.params.max_tokens


def test_bad_requests_and_a_full_queue(dense, tokenizer):
    engine = Engine(dense, tokenizer, max_queue=2)
    ok = SamplingParams(max_tokens=4)
    cases = [
        ([], ok, "prompt"),
        ([1, dense.config.vocab_size], ok, "prompt"),
        ([1] * 10, SamplingParams(max_tokens=CONTEXT - 9), "max_tokens"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], replace(ok, top_p=0.0), "top_p"),
        ([1], replace(ok, temperature=-1.0), "temperature"),
        ([1], replace(ok, repetition_penalty=0.0), "repetition_penalty"),
        ([1], replace(ok, stop=("",)), "stop"),
    ]
    for prompt, sp, param in cases:
        with pytest.raises(RequestError) as e:
            engine.submit(prompt, sp)
        assert e.value.param == param
    engine.submit([1], ok)
    engine.submit([1], ok)
    with pytest.raises(QueueFull):
        engine.submit([1], ok)


def test_a_failing_model_ends_its_rows_with_an_error_and_the_engine_goes_on(dense, tokenizer):
    engine = Engine(dense, tokenizer)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    r = engine.submit(tokenizer.encode("boom"), sp)
    engine.step()
    original = dense.forward

    def broken(*a, **k):
        raise RuntimeError("device lost")

    dense.forward = broken
    try:
        engine.step()
    finally:
        dense.forward = original
    assert r.status == "error" and "device lost" in r.error
    again = engine.generate([tokenizer.encode("boom")], sp)[0]
    assert again.output_ids == alone(dense, tokenizer, again.prompt_ids, sp)


@pytest.mark.parametrize("lengths", [[3, 7, 5], [5, 5, 5]], ids=["mixed", "equal"])
def test_row_cache_decode_matches_per_row_caches(dense, lengths):
    """RowKVCache: rows at different lengths decoded in one step give each row's own single-cache logits (and rows
    at one length, which write one column without an index, the same)."""
    torch.manual_seed(1)
    seqs = [torch.randint(0, dense.config.vocab_size, (n + 1,)) for n in lengths]
    rc = RowKVCache(dense.config, 4, 16)
    want = []
    with torch.inference_mode():
        from minimind_fast.model import KVCache

        for i, s in enumerate(seqs):
            one = KVCache(dense.config, 1, 16)
            dense(s[None, :-1], kv_cache=one)
            rc.load_row(i, one)
            want.append(dense(s[None, -1:], kv_cache=one).logits[0, -1])
        rc.set_rows(lengths)
        ids = torch.stack([s[-1:] for s in seqs])
        got = dense(ids, position_ids=torch.tensor(lengths)[:, None], kv_cache=rc).logits[:, -1]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    assert (rc.mask is None) == (len(set(lengths)) == 1)  # one length: no mask, one column written
    for i, n in enumerate(lengths):  # each row's new key went into its own column n, nothing after it
        assert rc.k[:, i, :, n].abs().sum() > 0 and rc.k[:, i, :, n + 1 :].abs().sum() == 0


def test_compiled_decode_step_gives_the_same_tokens(dense, tokenizer):
    """compile_decode traces the RowKVCache step (rows at different lengths, the mask on and off) with torch.compile;
    the aot_eager backend checks the capture without code generation."""
    reqs = mixed_requests(tokenizer, 6)
    engine = Engine(dense, tokenizer, max_batch=3, compile_decode="aot_eager")
    done = engine.generate([p for p, _ in reqs], [sp for _, sp in reqs])
    for r in done:
        assert r.output_ids == alone(dense, tokenizer, r.prompt_ids, r.params)
