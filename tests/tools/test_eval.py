"""tools/eval.py: the JSON and the printed table agree with evaluate.py called directly; adapters, side-by-side
models, sample sheets, and one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast import evaluate as ev
from minimind_fast import lora
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from minimind_fast.tokenizer import Tokenizer
from tools import eval as eval_tool

HELDOUT = [
    {"question": "What is Ada Brim's favourite colour?", "answer": "red", "kind": "colour", "choices": ["red", "blue"]},
    {"question": "Where does Ada Brim live?", "answer": "Oxwick", "kind": "town", "choices": ["Oxwick", "Eldby", "Mo"]},
    {"question": "What is 12 + 30?", "answer": "42", "kind": "arithmetic"},
]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    model.reset_parameters(std=0.1)  # context-dependent answers from a random model
    base = ckpt.save_checkpoint(root / "out" / "full_sft", model, model.config, Tokenizer.load())
    lora.apply_lora(model, rank=4)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    adapter = lora.save_adapter(root / "out" / "lora_identity", model)
    heldout = root / "eval.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in HELDOUT))
    mc = root / "mc.csv"
    mc.write_text("question,A,B,C,D,answer\nFirst?,a,b,c,d,A\nSecond?,e,f,g,h,D\n")
    return {"base": base, "adapter": adapter, "heldout": heldout, "mc": mc, "root": root}


def _run(capsys, *argv):
    rc = eval_tool.main([*argv, "--kernels", "torch", "--max_new_tokens", "6"])
    return rc, capsys.readouterr()


def test_results_match_the_library_and_the_table_shows_them(files, capsys, tokenizer):
    out = files["root"] / "r.json"
    rc, cap = _run(
        capsys,
        "--load", str(files["base"]),
        "--heldout", str(files["heldout"]),
        "--ppl", "data/sample/pretrain.jsonl",
        "--max_records", "5",
        "--mc", str(files["mc"]),
        "--samples", "2",
        "--out", str(out),
    )  # fmt: skip
    assert rc == 0, cap.err
    res = json.loads(out.read_text())["models"][0]
    model, _, _ = ckpt.load_model(files["base"])
    model.eval()
    items = ev.read_heldout(files["heldout"])
    gen = ev.heldout_generation(model, tokenizer, items, max_new_tokens=6)
    cho = ev.heldout_choice(model, tokenizer, items)
    assert res["heldout"]["summary"] == json.loads(json.dumps(ev.summarize_heldout(items, gen, cho)))
    assert [r["reply"] for r in res["heldout"]["items"]] == [g["reply"] for g in gen]
    ppl = ev.perplexity(model, tokenizer, "data/sample/pretrain.jsonl", max_records=5)
    assert res["perplexity"][0]["ppl"] == pytest.approx(ppl["ppl"], rel=1e-6) and res["perplexity"][0]["records"] == 5
    assert [m["score"] for m in res["mc"]] == ["letter", "text"] and res["mc"][0]["all"]["chance"] == 0.25
    for kind in ("colour", "town", "arithmetic", "all"):
        assert kind in cap.out
    chance_line = next(line for line in cap.out.splitlines() if line.startswith("colour"))
    assert " 50.0 " in chance_line  # chance of a two-way choice
    sheet = files["root"] / "r_samples_full_sft.md"
    text = sheet.read_text()
    assert HELDOUT[0]["question"] in text and "Who are you?" in text and "*expected:* red" in text


def test_side_by_side_with_and_without_an_adapter(files, capsys, tokenizer):
    rc, cap = _run(
        capsys,
        "--load", str(files["base"]), str(files["base"]),
        "--lora", "none", str(files["adapter"]),
        "--heldout", str(files["heldout"]),
        "--heldout_mode", "choice",
        "--prompts", "Who are you?",
    )  # fmt: skip
    assert rc == 0, cap.err
    default_out = files["base"].parent / "eval_full_sft_vs_full_sft+lora_identity.json"
    plain, adapted = json.loads(default_out.read_text())["models"]
    assert plain["lora"] is None and adapted["lora"] == str(files["adapter"])
    model, _, _ = ckpt.load_model(files["base"])
    lora.load_adapter(model, files["adapter"])
    reply = ev.sample_sheet(model.eval(), tokenizer, ["Who are you?"], max_new_tokens=6)[0]["reply"]
    assert adapted["samples"]["rows"][0]["reply"] == reply
    assert f"full_sft+lora_identity: 'Who are you?' -> {reply!r}" in cap.out
    assert "generation_acc" not in adapted["heldout"]["summary"]["all"]


def test_errors_are_one_line_with_status_1(files, capsys, tmp_path):
    rc, cap = _run(capsys, "--load", str(tmp_path / "nowhere"))
    assert rc == 1 and cap.err.startswith("error: ") and cap.err.count("\n") == 1 and "does not exist" in cap.err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(HELDOUT[0]) + "\n" + '{"question": "q"}\n')
    rc, cap = _run(capsys, "--load", str(files["base"]), "--heldout", str(bad))
    assert rc == 1 and "bad.jsonl:2" in cap.err
    rc, cap = _run(capsys, "--load", str(files["base"]), "--lora", str(files["base"]), "--heldout", "none")
    assert rc == 1 and "not an adapter" in cap.err
    with pytest.raises(SystemExit):
        eval_tool.main(["--load", "a", "b", "--lora", "x", "y", "z"])


def test_runs_as_a_script():
    done = subprocess.run([sys.executable, "tools/eval.py", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--heldout" in done.stdout


def test_chat_lora_flag_answers_with_the_merged_adapter(files, capsys, tokenizer):
    from tools import chat

    argv = ["--load", str(files["base"]), "--prompt", "Who are you?", "--temperature", "0", "--max_new_tokens", "6"]
    assert chat.main([*argv, "--kernels", "torch", "--lora", str(files["adapter"])]) == 0
    printed = capsys.readouterr().out.rsplit("\n[", 1)[0]  # the answer, without the speed line
    model, _, _ = ckpt.load_model(files["base"])
    lora.load_adapter(model, files["adapter"])
    want = ev.sample_sheet(model.eval(), tokenizer, ["Who are you?"], max_new_tokens=6)[0]["reply"]
    base_reply = ev.sample_sheet(ckpt.load_model(files["base"])[0].eval(), tokenizer, ["Who are you?"], 6)[0]["reply"]
    assert printed.strip() == want and want and want != base_reply
    assert chat.main([*argv, "--lora", str(files["root"] / "missing")]) == 1
    assert "error: --lora: adapter" in capsys.readouterr().err


TOOL_HELDOUT = [
    {"question": "What is 37 + 48?", "answer": "85", "kind": "arithmetic"},
    {"question": "What is 12 + 30?", "answer": "42", "kind": "arithmetic"},
    {"question": "What is Ada Brim's favourite colour?", "answer": "red", "kind": "colour"},
]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, tokenizer):
    """A tiny model taught to answer the first held-out question with the calculator, asked as --tools asks it by
    default (after the system message "You are a helpful assistant.") and offered as --world none offers it (the
    calculator's spec alone)."""
    from minimind_fast.toolcall import TOOL_SPECS
    from tests.minimind._agent_script import CALC, teach, with_tools

    root = tmp_path_factory.mktemp("eval_tools")
    system = {"role": "system", "content": "You are a helpful assistant."}
    model = teach([with_tools(CALC, TOOL_SPECS[:1], (system, *CALC.messages))])
    heldout = root / "eval.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in TOOL_HELDOUT))
    return {"base": ckpt.save_checkpoint(root / "tool_sft", model, model.config, tokenizer), "heldout": heldout}


def test_tools_mode_records_turns_calls_and_replies_and_counts_them_right(tool_model, capsys):
    out = tool_model["base"].parent / "tools.json"
    argv = ["--load", str(tool_model["base"]), "--heldout", str(tool_model["heldout"]), "--tools", "--world", "none",
            "--samples", "0", "--kernels", "torch", "--max_new_tokens", "64", "--out", str(out)]  # fmt: skip
    assert eval_tool.main(argv) == 0
    cap = capsys.readouterr()
    res = json.loads(out.read_text())["models"][0]["heldout"]
    rows = res["items"]
    assert rows[0]["calls"] == [
        {"name": "calculator", "arguments": {"expression": "37 + 48"}, "result": '{"result": 85}'}
    ]
    assert (rows[0]["turns"], rows[0]["reply"], rows[0]["finished"], rows[0]["gen_correct"]) == (
        2, "37 + 48 = 85.", True, True
    )  # fmt: skip
    for row in rows:
        assert set(row) >= {"question", "answer", "kind", "reply", "gen_correct", "turns", "calls", "finished"}
        assert 1 <= row["turns"] <= 3 and (row["finished"] or row["reply"] == "")
        assert row["gen_correct"] == ev.answer_matches(row["answer"], row["reply"])
    # The summary recounted from the records: accuracy with the matcher, and the share of items with a call.
    for kind in ("arithmetic", "colour", "all"):
        mine = [r for r in rows if kind in ("all", r["kind"])]
        s = res["summary"][kind]
        assert s["n"] == len(mine)
        assert s["generation_acc"] == sum(ev.answer_matches(r["answer"], r["reply"]) for r in mine) / len(mine)
        assert s["tool_call_share"] == sum(bool(r["calls"]) for r in mine) / len(mine)
    assert res["summary"]["arithmetic"]["tool_call_share"] >= 0.5 and res["summary"]["all"]["generation_acc"] > 0
    table = cap.out.split("held-out items where a tool was called (%)\n", 1)[1].splitlines()
    all_row = next(line for line in table if line.startswith("all"))
    assert all_row.split("|")[1].strip() == f"{100 * res['summary']['all']['tool_call_share']:.1f}"

    rc = eval_tool.main(argv + ["--world", str(tool_model["heldout"].parent / "missing.json")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: --world") and err.count("\n") == 1
