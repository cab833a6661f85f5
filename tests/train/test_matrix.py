"""Every preset through every stage, chained as users chain them, on CPU: tiny dense and tiny MoE (preset tiny with
--use_moe 1) through pretrain -> sft -> lora / dpo / distill / grpo / ppo / spo / agent (agentic RL, grpo --agent 1
with the tools) (each from the SFT output) and dpo -> distill_reason (MiniMind's order), two optimizer steps each on
tiny batches. The MiniMind-3-shaped m3-tiny, dense and MoE, takes a shorter path (pretrain -> sft -> lora / grpo /
agent, and pretrain -> sft -> dpo / agent): its stages run the same code as MiniMind2's; what differs is the model,
which every stage exercises through pretrain and SFT.

Each stage runs once per preset (a module-scoped cache). Most stages run one step, then `--from_resume 1
--max_steps 2` continues in the same folder from the step-1 checkpoint. For pretrain and SFT an uninterrupted 2-step
run saves after each step and a copy of its step-1 resume folder is resumed (a run that died after step 1): the
resumed step must log what the uninterrupted one logged and end on bit-identical weights. (Every stage's own test
file checks exact resumption on a dense model; the RL stages are left out here to keep the matrix short.)

Then, for each preset x stage: the output reloads (ckpt.load_model; a LoRA adapter merged into its base) with the
file's tensors under MiniMind's names and the logits of the same tensors loaded as a MiniMind .pth;
tools/export.py writes a transformers folder (LlamaForCausalLM for dense, Qwen2MoeForCausalLM for MoE) whose logits
match ours; tools/eval.py reports what the evaluation library computes on the reloaded model; tools/serve.py loads
it and answers a chat completion as generate() does. Last, the MoE checkpoint is resumed and saved by 2 FSDP2 ranks.

About 3-4 minutes on a 2-core CPU, most of it in the 40 stage runs (each loads, saves and hashes its checkpoints).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers
from _stage_helpers import metric_rows
from safetensors.torch import load_file

from minimind_fast import checkpoint as ckpt
from minimind_fast import evaluate as ev
from minimind_fast import lora
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind
from tools import eval as eval_tool
from tools import export, serve
from train import distill, distill_reason, dpo, grpo, ppo, pretrain, sft, spo
from train import lora as lora_stage

pytestmark = pytest.mark.usefixtures("one_thread_module")

REPO = Path(__file__).resolve().parents[2]
PRESETS = {
    "dense": ["--preset", "tiny"],
    "moe": ["--preset", "tiny", "--use_moe", "1"],
    "m3": ["--preset", "m3-tiny"],
    "m3-moe": ["--preset", "m3-tiny", "--use_moe", "1"],
}
STAGES = ("pretrain", "sft", "lora", "dpo", "distill", "distill_reason", "grpo", "ppo", "spo", "agent")
PRESET_STAGES = {"m3": ("pretrain", "sft", "lora", "grpo", "agent"), "m3-moe": ("pretrain", "sft", "dpo", "agent")}
# What tools/export.py hf makes of each preset.
HF_CLASS = {"dense": "LlamaForCausalLM", "moe": "Qwen2MoeForCausalLM", "m3": "Qwen3ForCausalLM"}
HF_CLASS["m3-moe"] = "Qwen3MoeForCausalLM"
# Where each stage starts: the SFT model, except SFT (pretrain) and reasoning distillation (DPO).
PARENT = {s: "sft" for s in STAGES[2:]} | {"sft": "pretrain", "distill_reason": "dpo"}
EXACT = ("pretrain", "sft")  # resumed runs compared with an uninterrupted one
# Logged fields that measure the machine, not the model: they differ between two runs of the same steps.
TIMING = ("_per_s", "seconds", "mfu")
ATOL = 1e-4  # fp32 logits from two implementations: summation order only
HELDOUT = {"question": "Where does Ada Brim live?", "answer": "Oxwick", "kind": "town", "choices": ["Oxwick", "Eldby"]}
IDS = torch.randint(3, 6400, (2, 13), generator=torch.Generator().manual_seed(7))

RUN = ["--kernels", "torch", "--device", "cpu", "--log_interval", "1", "--keep_last", "3"]
POST = ["--batch_size", "2", "--max_seq_len", "40", "--learning_rate", "1e-3"]
RL = ["--batch_size", "2", "--max_seq_len", "32", "--max_gen_len", "4", "--reward", "rule+shaping"]
RL += ["--learning_rate", "1e-3"]
# Agentic RL (grpo --agent 1): prompts carry the tools block (420-630 tokens), two model turns of 4 tokens, the
# calculator and lookup over the shipped world file.
AGENT = ["--agent", "1", "--batch_size", "2", "--num_generations", "2", "--max_seq_len", "700", "--max_gen_len", "4"]
AGENT += ["--max_turns", "2", "--reward", "rule+shaping", "--learning_rate", "1e-3"]


def _slice(src: str, dst: Path, n: int) -> str:
    dst.write_text("".join((REPO / "data" / "sample" / src).read_text().splitlines(keepends=True)[:n]))
    return str(dst)


def _quiet(fn, *args):
    """fn(*args) with its stdout kept -> (result, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = fn(*args)
    return res, out.getvalue()


class Matrix:
    """Runs (and remembers) each preset x stage: run(preset, stage) -> its record, running the stage it starts from
    first. A failure is remembered too, so the stages after it fail naming it instead of running it again."""

    def __init__(self, root: Path, rl_prompts: Path):
        self.root = root
        self.data = {
            "pretrain": _slice("pretrain.jsonl", root / "pretrain.jsonl", 32),
            "sft": _slice("sft.jsonl", root / "sft.jsonl", 16),
            "lora": _slice("lora_identity.jsonl", root / "lora.jsonl", 16),
            "dpo": _slice("dpo.jsonl", root / "dpo.jsonl", 16),
            "distill": _slice("sft.jsonl", root / "distill.jsonl", 16),
            "distill_reason": _slice("r1_mix.jsonl", root / "r1.jsonl", 16),
            "rl": str(rl_prompts),
            "agent": _slice("rl_tools.jsonl", root / "rl_tools.jsonl", 8),
        }
        self.records: dict[tuple[str, str], dict | BaseException] = {}

    def argv(self, preset: str, stage: str) -> tuple[object, list[str], Path | None]:
        """(stage module, its argv without --out_dir and step flags, the checkpoint it starts from)."""
        start = self.run(preset, PARENT[stage])["out"] if stage in PARENT else None
        table = {
            "pretrain": (pretrain, [*PRESETS[preset], "--max_seq_len", "32", "--batch_size", "2"]),
            "sft": (sft, [*POST, "--group_by_length", "0"]),
            "lora": (lora_stage, [*POST, "--lora_rank", "4"]),
            "dpo": (dpo, [*POST, "--eval_fraction", "0"]),
            "distill": (distill, [*POST, "--teacher", str(start), "--kl_chunk", "64"]),
            "distill_reason": (distill_reason, POST),
            "grpo": (grpo, [*RL, "--num_generations", "2"]),
            "ppo": (ppo, [*RL, "--mini_batch_size", "2", "--ppo_epochs", "1", "--critic_learning_rate", "1e-3"]),
            "spo": (spo, [*RL, "--accumulation_steps", "1"]),
            "agent": (grpo, AGENT),
        }
        module, extra = table[stage]
        argv = RUN + (["--from_weight", str(start)] if start else []) + extra
        return module, argv + ["--data_path", self.data["rl" if stage in ("grpo", "ppo", "spo") else stage]], start

    def run(self, preset: str, stage: str) -> dict:
        key = (preset, stage)
        if key not in self.records:
            try:
                self.records[key] = self._run(preset, stage)
            except BaseException as exc:  # SystemExit too: a stage's one-line error
                self.records[key] = exc
                raise
        rec = self.records[key]
        if isinstance(rec, BaseException):
            pytest.fail(f"{preset} {stage} failed earlier: {type(rec).__name__}: {rec}")
        return rec

    def _run(self, preset: str, stage: str) -> dict:
        module, argv, start = self.argv(preset, stage)
        full = self.root / preset / stage
        t0 = time.perf_counter()
        rec = {"start": start, "exact": stage in EXACT}
        if stage in EXACT:
            res, _ = _quiet(module.main, argv + ["--max_steps", "2", "--save_interval", "1", "--out_dir", str(full)])
            rec["name"] = name = Path(res["out"]).name
            rec["before"] = metric_rows(full, name)
            step1 = full / f"{name}_resume" / "step_00000001"
            cut = self.root / preset / f"{stage}_cut"
            shutil.copytree(step1, cut / step1.parent.name / step1.name)
            _, rec["resume_log"] = _quiet(
                module.main, argv + ["--max_steps", "2", "--from_resume", "1", "--out_dir", str(cut)]
            )
            rec["after"] = metric_rows(cut, name)
            rec["resumed_out"] = cut / name
        else:
            res, _ = _quiet(module.main, argv + ["--max_steps", "1", "--out_dir", str(full)])
            rec["name"] = name = Path(res["out"]).name
            rec["before"] = metric_rows(full, name)
            _, rec["resume_log"] = _quiet(
                module.main, argv + ["--max_steps", "2", "--from_resume", "1", "--out_dir", str(full)]
            )
            rec["after"] = metric_rows(full, name)
            rec["resumed_out"] = full / name
        rec["out"] = full / name
        rec["seconds"] = time.perf_counter() - t0
        return rec

    def model(self, preset: str, stage: str) -> MiniMind:
        """The stage's result as users load it (a checkpoint folder, or a LoRA adapter merged into its base), in eval
        mode; loaded once and shared by the checks, which only read it."""
        rec = self.run(preset, stage)
        if "model" not in rec:
            if stage == "lora":
                model, _, _ = ckpt.load_model(rec["start"])
                lora.load_adapter(model, rec["out"])
                lora.remove_lora(model, merge=True)
            else:
                model, _, _ = ckpt.load_model(rec["out"])
            rec["model"] = model.eval()
        return rec["model"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, rl_prompts):
    m = Matrix(tmp_path_factory.mktemp("matrix"), rl_prompts)
    yield m
    done = {f"{p}-{s}": round(r["seconds"], 1) for (p, s), r in m.records.items() if isinstance(r, dict)}
    print(f"\nmatrix: seconds per stage (runs and resumes): {done}; total {sum(done.values()):.1f}")


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _tool_load(rec: dict, stage: str) -> list[str]:
    """The --load (and --lora) flags that name the stage's result to export, eval and serve."""
    if stage == "lora":
        return ["--load", str(rec["start"]), "--lora", str(rec["out"])]
    return ["--load", str(rec["out"])]


CASES = [pytest.param(p, s, id=f"{p}-{s}") for p in PRESETS for s in PRESET_STAGES.get(p, STAGES)]


@pytest.mark.parametrize("preset,stage", CASES)
def test_result_is_saved_under_minimind_names_and_reloads(matrix, preset, stage, tmp_path):
    rec = matrix.run(preset, stage)
    model = matrix.model(preset, stage)
    assert model.config.use_moe is preset.endswith("moe") and model.config.qk_norm is preset.startswith("m3")
    if stage == "lora":  # only the adapter is saved; merged, it moves exactly the square projections it targets
        saved = load_file(rec["out"] / "adapter.safetensors")
        assert saved and all(".lora_A" in k or ".lora_B" in k for k in saved), sorted(saved)[:4]
        base, merged = ckpt.load_model_state(rec["start"]), model.state_dict()
        changed = [k for k in base if not torch.equal(base[k], merged[k])]
        assert changed and all(k.endswith(("q_proj.weight", "o_proj.weight")) for k in changed), changed
        return
    saved = load_file(rec["out"] / ckpt.MODEL_FILE)
    cfg = model.config
    experts = {k for k in saved if ".mlp.experts." in k}
    if cfg.use_moe:  # MiniMind2-MoE's per-expert names, not the stacked parameters' own
        assert experts == {
            f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
            for i in range(cfg.num_hidden_layers)
            for e in range(cfg.n_routed_experts)
            for p in ("gate", "up", "down")
        }
    else:
        assert not experts
    sd = model.state_dict()
    assert set(sd) == set(saved) | {ckpt.TIED_KEY}
    assert all(torch.equal(sd[k], v) for k, v in saved.items())
    # The same tensors as a MiniMind2 .pth (a plain state dict) load into a fresh model with identical logits.
    torch.save(saved, tmp_path / "weights.pth")
    other = MiniMind(cfg)
    ckpt.load_minimind_pth(other, tmp_path / "weights.pth")
    assert torch.equal(_logits(other.eval()), _logits(model))
    if rec["start"] is not None:  # training moved the weights it started from
        first = ckpt.load_model_state(rec["start"])
        assert any(not torch.equal(first[k], v) for k, v in saved.items())


@pytest.mark.parametrize("preset,stage", CASES)
def test_resume_continues_from_the_saved_step(matrix, preset, stage):
    rec = matrix.run(preset, stage)
    assert re.search(r"resumed .*step_00000001 at step 1\b", rec["resume_log"]), rec["resume_log"]
    state = ckpt.load_train_state(rec["resumed_out"].parent / f"{rec['name']}_resume" / "step_00000002")
    assert state["step"] == 2
    if not rec["exact"]:
        # The 1-step run's record stays as it was (its timings too: step 1 was not run again); step 2 follows it.
        assert sorted(rec["before"]) == [1] and sorted(rec["after"]) == [1, 2]
        assert rec["after"][1] == rec["before"][1]
        return
    # Died after step 1, resumed: step 2 only, logged as the uninterrupted run logged it; bit-identical weights.
    assert sorted(rec["before"]) == [1, 2] and sorted(rec["after"]) == [2]
    strip = lambda row: {k: v for k, v in row.items() if not k.endswith(TIMING)}  # noqa: E731
    assert strip(rec["after"][2]) == strip(rec["before"][2])
    a, b = ckpt.load_model_state(rec["out"]), ckpt.load_model_state(rec["resumed_out"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset,stage", CASES)
def test_export_to_transformers_gives_our_logits(matrix, preset, stage, tmp_path):
    rec = matrix.run(preset, stage)
    _quiet(export.main, ["hf", "--out", str(tmp_path / "hf"), *_tool_load(rec, stage)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32)
    assert type(hf).__name__ == HF_CLASS[preset]
    with torch.no_grad():
        theirs = hf.eval()(IDS).logits.float()
    assert torch.allclose(theirs, _logits(matrix.model(preset, stage)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset,stage", CASES)
def test_eval_tool_reports_the_reloaded_model(matrix, preset, stage, tmp_path, tokenizer):
    rec = matrix.run(preset, stage)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps(HELDOUT) + "\n")
    text = matrix.data["pretrain"]
    argv = [*_tool_load(rec, stage), "--heldout", str(heldout), "--heldout_mode", "choice", "--ppl", text]
    argv += ["--max_records", "2", "--max_seq_len", "64", "--samples", "0", "--kernels", "torch", "--device", "cpu"]
    rc, _ = _quiet(eval_tool.main, argv + ["--out", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())["models"][0]
    model = matrix.model(preset, stage)
    ppl = ev.perplexity(model, tokenizer, text, max_seq_len=64, max_records=2)
    assert res["perplexity"][0]["ppl"] == pytest.approx(ppl["ppl"], rel=1e-6) and res["perplexity"][0]["records"] == 2
    items = ev.read_heldout(heldout)
    choice = ev.heldout_choice(model, tokenizer, items)
    assert res["heldout"]["summary"] == json.loads(json.dumps(ev.summarize_heldout(items, None, choice)))


@pytest.mark.parametrize("preset,stage", CASES)
def test_serve_answers_a_chat_completion_as_generate_does(matrix, preset, stage):
    from fastapi.testclient import TestClient

    rec = matrix.run(preset, stage)
    args = serve.parse_args([*_tool_load(rec, stage), "--device", "cpu", "--kernels", "torch"])
    with contextlib.redirect_stderr(io.StringIO()):
        model, tok = serve.load_for_serving(args)
    messages = [{"role": "user", "content": "Who lives in Oxwick?"}]
    request = {"model": "m", "messages": messages, "max_tokens": 4, "temperature": 0}
    with TestClient(serve.create_app(serve.Engine(model, tok), "m")) as client:
        r = client.post("/v1/chat/completions", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = generate(matrix.model(preset, stage), [ids], 4, greedy=True)[0]
    assert body["choices"][0]["message"]["content"] == tok.decode(out, skip_special_tokens=True)
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(out),
        "total_tokens": len(ids) + len(out),
    }


def test_moe_checkpoint_resumes_under_fsdp2_and_saves_minimind_names(matrix, torchrun, tmp_path):
    """The sharded path: 2 FSDP2 ranks (gloo) resume the tiny MoE pretrain's step-1 checkpoint (full state scattered
    into DTensors under the banks' parameter names) and save step 2 (gathered, then written under MiniMind's
    per-expert names). Same global batch as the one-process run, so step 2 logs the same loss."""
    rec = matrix.run("moe", "pretrain")
    _, argv, _ = matrix.argv("moe", "pretrain")
    step1 = rec["out"].parent / "pretrain_resume" / "step_00000001"
    shutil.copytree(step1, tmp_path / "pretrain_resume" / step1.name)
    argv[argv.index("--batch_size") + 1] = "1"  # per rank: 2 ranks x 1 = the one-process run's batch of 2
    torchrun("pretrain.py", argv + ["--fsdp", "1", "--max_steps", "2", "--from_resume", "1", "--out_dir", tmp_path])
    got = metric_rows(tmp_path, "pretrain")
    assert sorted(got) == [2] and got[2]["loss"] == pytest.approx(rec["before"][2]["loss"], abs=2e-5)
    sharded, single = load_file(tmp_path / "pretrain" / ckpt.MODEL_FILE), load_file(rec["out"] / ckpt.MODEL_FILE)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in sharded and set(sharded) == set(single)
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], atol=1e-5, rtol=0, msg=k)  # measured: 7e-7
