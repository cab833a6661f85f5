"""minimind_fast/evaluate.py against independent computations on tiny random models: perplexity, completion scores,
held-out accuracy with a hand-built bias, the answer matcher, C-Eval/CMMLU readers and their errors."""

import json
import math

import pytest
import torch

from minimind_fast import evaluate as ev
from minimind_fast.config import from_preset
from minimind_fast.data import DataError
from minimind_fast.model import MiniMind

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _small(seed: int = 0) -> MiniMind:
    torch.manual_seed(seed)
    return MiniMind(from_preset("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4)).eval()


def biased_model(fav: int) -> MiniMind:
    """A model that, whatever the context, puts almost all probability on token `fav`.

    Block outputs are zeroed (o_proj = down_proj = 0), so the final hidden state is RMSNorm(embedding of the current
    token) times the final norm's gain; the gain keeps only dimension 0, where every embedding holds 1 and fav's holds
    5. The (tied) logit of token v is then n0 * E[v, 0] with n0 > 0: fav's is 5x every other token's."""
    model = _small()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        emb[fav, 0] = 5.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
    return model


def _single_tokens(tokenizer, words):
    out = [w for w in words if len(tokenizer.encode(w)) == 1]
    assert len(out) >= 3, out
    return out


def _write(path, lines):
    path.write_text("".join(lines))
    return path


def _logp_by_hand(model, ids):
    """Float64 log-softmax of the full logits of one sequence: [T, V]."""
    return model(torch.tensor([ids])).logits[0].double().log_softmax(dim=-1)


# ------------------------------------------------------------------------------------------------------ perplexity
def test_perplexity_of_pretrain_text_is_exp_mean_nll_from_logits(tmp_path, tokenizer):
    texts = ["The sea is wide and grey.", "Kethmar has sixteen towns.", "7 + 8 = 15", "a " * 40]
    path = _write(tmp_path / "p.jsonl", [json.dumps({"text": t}) + "\n" for t in texts])
    model = _small()
    got = ev.perplexity(model, tokenizer, path, max_seq_len=24, batch_size=3)
    total, count = 0.0, 0
    for t in texts:
        ids = ([tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id])[:24]
        lp = _logp_by_hand(model, ids)
        total -= sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)))
        count += len(ids) - 1
    assert got["format"] == "pretrain" and got["records"] == 4 and got["tokens"] == count
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_of_sft_data_scores_only_the_assistant_reply(tmp_path, tokenizer):
    convs = [("What is 2 + 2?", "2 + 2 = 4."), ("Who are you?", "An assistant for Kethmar.")]
    path = _write(
        tmp_path / "s.jsonl",
        [
            json.dumps({"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in convs
        ],
    )
    model = _small()
    got = ev.perplexity(model, tokenizer, path, batch_size=2)
    total, count = 0.0, 0
    for q, a in convs:
        system = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"  # the template's default system turn
        prompt = tokenizer.encode(f"{system}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
        reply = tokenizer.encode(f"{a}<|im_end|>\n")
        ids = prompt + reply
        assert ids == tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        )
        lp = _logp_by_hand(model, ids)
        total -= sum(lp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids)))
        count += len(reply)
    assert got["format"] == "sft" and got["tokens"] == count
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_completion_scores_match_full_forward_logits():
    model = _small(3)
    pairs = [
        ([1, 50, 60, 70], [80, 90]),
        ([1, 50, 60, 70], [100]),
        ([1, 50, 60, 70], [110, 120, 130]),
        ([7], [8, 9]),  # a one-token prompt: nothing to cache
        ([1, 40, 41], [42]),
    ]
    got = ev.completion_logprobs(model, pairs, batch_size=2)  # the first prompt's 3 completions span 2 chunks
    for (prompt, comp), g in zip(pairs, got):
        lp = _logp_by_hand(model, prompt + comp)
        want = sum(lp[len(prompt) - 1 + j, comp[j]].item() for j in range(len(comp)))
        assert g == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------------------------------------- held-out items
@pytest.mark.parametrize(
    "answer, reply, hit",
    [
        ("28", "71 - 43 = 28.", True),
        ("28", "71 - 43 = 128.", False),
        ("28", "it is 2.28 or so", False),
        ("28", "28th", False),
        ("5", "3 - 8 = -5", False),
        ("-5", "3 - 8 = -5", True),
        ("66", "Drithyrk is 66 years old.", True),
        ("red", "Her favourite colour is reddish.", False),
        ("red", "Red.", True),
        ("Heixmere", "She lives in heixmere", True),
        ("thornmoth", "keeps a thornmoth as a pet", True),
        ("27", "It is 26, 27 or 28.", False),  # a hedge is judged by its last number
        ("28", "It is 26, 27 or 28.", True),
        ("34", "22 + 12 = 34, not 33.", False),
        ("8", "3-8", True),  # a subtraction sign is not a negative number
        ("-8", "3-8", False),
        ("3.5", "7 / 2 = 3.50", True),  # compared as numbers
        ("12", "call x12", False),  # part of a word
    ],
)
def test_answer_matches(answer, reply, hit):
    assert ev.answer_matches(answer, reply) is hit


def _heldout_file(tmp_path, items):
    return _write(tmp_path / "eval.jsonl", [json.dumps(it) + "\n" for it in items])


def test_choice_scoring_picks_the_option_a_bias_favours(tmp_path, tokenizer):
    words = _single_tokens(tokenizer, ["red", "cat", "no", "A", "B"])
    fav = words[1]
    items = ev.read_heldout(
        _heldout_file(
            tmp_path,
            [
                {"question": "Which one?", "answer": fav, "kind": "x", "choices": words},
                {"question": "And this time?", "answer": words[0], "kind": "x", "choices": words},
                {"question": "Two options?", "answer": fav, "kind": "y", "choices": [words[2], fav]},
                {"question": "What is 2 + 2?", "answer": "4", "kind": "sum"},
            ],
        )
    )
    model = biased_model(tokenizer.encode(fav)[0])
    res = ev.heldout_choice(model, tokenizer, items, batch_size=2)
    assert [r["pred"] for r in res[:3]] == [fav, fav, fav] and res[3] is None
    assert [r["correct"] for r in res[:3]] == [True, False, True]
    assert max(res[0]["scores"]) == res[0]["scores"][1] and res[0]["scores"][1] > -0.01  # fav: p ~ 1
    summary = ev.summarize_heldout(items, choice=res)
    assert summary["x"]["choice_acc"] == 0.5 and summary["y"]["choice_acc"] == 1.0
    assert summary["x"]["chance"] == pytest.approx(1 / len(words)) and summary["y"]["chance"] == 0.5
    assert summary["sum"]["chance"] is None and summary["sum"]["choice_acc"] is None
    assert summary["all"]["choice_acc"] == pytest.approx(2 / 3)
    assert summary["all"]["chance"] == pytest.approx((2 / len(words) + 0.5) / 3)


def test_generation_accuracy_with_a_biased_model(tmp_path, tokenizer):
    fav_id = tokenizer.encode(" red")
    assert len(fav_id) == 1
    items = ev.read_heldout(
        _heldout_file(
            tmp_path,
            [
                {"question": "Colour?", "answer": "red", "kind": "colour", "choices": ["red", "blue"]},
                {"question": "Colour again?", "answer": "blue", "kind": "colour", "choices": ["red", "blue"]},
                {"question": "Sum?", "answer": "4", "kind": "sum"},
            ],
        )
    )
    res = ev.heldout_generation(biased_model(fav_id[0]), tokenizer, items, max_new_tokens=4, batch_size=2)
    assert [r["reply"] for r in res] == ["red red red red"] * 3
    assert [r["correct"] for r in res] == [True, False, False]
    summary = ev.summarize_heldout(items, generation=res)
    assert summary["colour"]["generation_acc"] == 0.5 and summary["all"]["generation_acc"] == pytest.approx(1 / 3)


def test_heldout_reader_errors_name_path_and_line(tmp_path):
    ok = json.dumps({"question": "q?", "answer": "a", "kind": "k"})
    cases = [
        ('{"question": "q?", "kind": "k"}', 'field "answer"'),
        ('{"question": "q?", "answer": "z", "kind": "k", "choices": ["a", "b"]}', "not one of its"),
        ('{"question": "q?", "answer": "a", "kind": "k", "choices": "ab"}', '"choices" must be'),
        ('{"question": "q?", ', "malformed JSON"),
    ]
    for bad, msg in cases:
        path = _write(tmp_path / "h.jsonl", [ok + "\n", "\n", bad + "\n"])
        with pytest.raises(DataError, match=rf"h\.jsonl:3: .*{msg}"):
            ev.read_heldout(path)
    with pytest.raises(DataError, match="empty file"):
        ev.read_heldout(_write(tmp_path / "e.jsonl", []))


# --------------------------------------------------------------------------------------------- multiple choice
CEVAL_CSV = (
    "id,question,A,B,C,D,answer,explanation\n"
    '0,"Which is a colour?",red,cat,no,dog,A,"red is"\n'
    '1,"A question\nover two lines",x,y,z,w,C,\n'
    "2,Third,p,q,r,s,c,\n"
)
CMMLU_CSV = ",Question,A,B,C,D,Answer\n0,First?,a,b,c,d,B\n1,Second?,e,f,g,h,D\n"


def test_mc_readers_csv_jsonl_and_folders(tmp_path):
    items = ev.read_mc(_write(tmp_path / "ceval_val.csv", [CEVAL_CSV]))
    assert [it.answer for it in items] == [0, 2, 2]
    assert items[1].question == "A question\nover two lines" and items[1].options == ["x", "y", "z", "w"]
    assert items[0].subject == "ceval_val" and items[2].where.endswith("ceval_val.csv:5")
    cmmlu = ev.read_mc(_write(tmp_path / "cmmlu.csv", [CMMLU_CSV]))
    assert [(it.question, it.answer) for it in cmmlu] == [("First?", 1), ("Second?", 3)]
    rec = {"question": "Three options", "A": "1", "B": "2", "C": "3", "answer": "B"}
    jl = ev.read_mc(_write(tmp_path / "x.jsonl", [json.dumps(rec) + "\n"]))
    assert jl[0].options == ["1", "2", "3"] and jl[0].answer == 1
    folder = tmp_path / "bench"
    folder.mkdir()
    _write(folder / "b_math.csv", [CMMLU_CSV])
    _write(folder / "a_art.jsonl", [json.dumps(rec) + "\n"])
    both = ev.read_mc(folder)
    assert [it.subject for it in both] == ["a_art", "b_math", "b_math"]


@pytest.mark.parametrize(
    "text, where, msg",
    [
        ("question,A,B,C,D\nq,a,b,c,d\n", ":1", "no 'answer' column"),
        ("question,A,B,C,D,answer\nq,a,b,c,d,A\nq2,a,b,c,d,E\n", ":3", "not one of the option letters A-D"),
        ("question,A,B,C,D,answer\nq,a,b,c,d,\n", ":2", 'empty "answer".*test split'),
        ("question,A,B,C,D,answer\nq,a,b,c,A\n", ":2", "5 columns, the header has 6"),
        ("question,A,B,answer\n,a,b,A\n", ":2", 'empty "question"'),
    ],
)
def test_mc_reader_errors_name_path_and_line(tmp_path, text, where, msg):
    path = _write(tmp_path / "bad.csv", [text])
    with pytest.raises(DataError, match=rf"bad\.csv{where}: .*{msg}"):
        ev.read_mc(path)


def test_mc_scoring_by_letter_and_by_text_follows_the_bias(tmp_path, tokenizer):
    words = _single_tokens(tokenizer, ["red", "cat", "no", "the", "is", "old"])[:3]
    lines = ["question,A,B,C,answer\n"] + [f"q{i},{words[0]},{words[1]},{words[2]},{a}\n" for i, a in enumerate("CCAB")]
    items = ev.read_mc(_write(tmp_path / "m.csv", lines))
    letter = ev.mc_accuracy(biased_model(tokenizer.encode("C")[0]), tokenizer, items, score="letter")
    assert letter["preds"] == ["C"] * 4 and letter["all"]["acc"] == 0.5
    assert letter["all"]["chance"] == pytest.approx(1 / 3) and letter["subjects"]["m"]["n"] == 4
    text = ev.mc_accuracy(biased_model(tokenizer.encode(words[0])[0]), tokenizer, items, score="text")
    assert text["preds"] == ["A"] * 4 and text["all"]["acc"] == 0.25
    raw = ev.mc_accuracy(biased_model(tokenizer.encode(" C")[0]), tokenizer, items, template="raw")
    assert raw["preds"] == ["C"] * 4


def test_sample_sheet_is_the_greedy_generation_written_as_markdown(tmp_path, tokenizer):
    model = _small(5)
    prompts = ["Who are you?", "What is 3 + 4?"]
    rows = ev.sample_sheet(model, tokenizer, prompts, max_new_tokens=6)
    from minimind_fast.generate import generate

    for p, r in zip(prompts, rows):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], True, tokenize=True)
        (want,) = generate(model, [ids], 6, greedy=True)
        assert r["reply"] == tokenizer.decode(want, skip_special_tokens=True).strip()
    rows[0]["expected"] = "Lumen"
    md = ev.write_sample_sheet(tmp_path / "s.md", "Samples", rows).read_text()
    assert md.startswith("# Samples") and "> Who are you?" in md and "> What is 3 + 4?" in md
    assert "*expected:* Lumen" in md
