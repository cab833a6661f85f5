"""The supervised stages' hot loop never waits on the host: inside an optimizer step that neither logs nor saves, no
tensor is turned into a Python value (`.item()`, `bool()`, `float()`, `int()`), the calls that make a CUDA program
wait for the device. Counted on the CPU by wrapping those methods of torch.Tensor for the whole run and cutting the
count at each step of the progress bar."""

import json
import re

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from train import common, distill, distill_reason, dpo, lora, pretrain, sft

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
STEPS = 5
QUIET = ["--kernels", "torch", "--max_steps", str(STEPS), "--log_interval", "100", "--save_interval", "100"]


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("syncs")
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", **TINY))
    ckpt.save_checkpoint(root / "sft", model, model.config, tokenizer)
    return root


STAGES = {
    "pretrain": (pretrain, "--preset tiny --max_seq_len 64 --batch_size 2"),
    "sft": (sft, "--from_weight {sft} --max_seq_len 64 --batch_size 2"),
    "lora": (lora, "--from_weight {sft} --data_path data/sample/lora_identity.jsonl --max_seq_len 64 --batch_size 2"),
    "dpo": (dpo, "--from_weight {sft} --max_seq_len 64 --batch_size 2 --eval_fraction 0"),
    "distill": (distill, "--from_weight {sft} --teacher {sft} --max_seq_len 64 --batch_size 2"),
    "distill_reason": (distill_reason, "--from_weight {sft} --max_seq_len 64 --batch_size 2"),
}


class SyncCounter:
    """Counts the tensor -> Python conversions, attributed to the optimizer step running when they happen."""

    METHODS = ("item", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.step: int | None = None  # None: outside the loop
        self.calls: dict[int | None, list[str]] = {}
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        real_progress = common.progress

        def progress(start, total, desc, rt):
            bar = real_progress(start, total, desc, rt)
            outer = self

            class Counted:  # the bar, with each step's calls attributed to that step
                def __iter__(self):
                    for s in bar:
                        outer.step = s
                        yield s
                    outer.step = None

                def __getattr__(self, name):
                    return getattr(bar, name)

            return Counted()

        monkeypatch.setattr(common, "progress", progress)

    def _wrap(self, real, name):
        def counted(tensor, *a, **kw):
            self.calls.setdefault(self.step, []).append(name)
            return real(tensor, *a, **kw)

        return counted


@pytest.mark.parametrize(
    "stage, cpu_default",
    [(s, False) for s in STAGES] + [("pretrain", True), ("sft", True)],
    ids=list(STAGES) + ["pretrain-cpu-bf16", "sft-cpu-bf16"],
)
def test_no_host_sync_in_a_step_that_neither_logs_nor_saves(stage, cpu_default, start, tmp_path, monkeypatch, capsys):
    module, flags = STAGES[stage]
    counter = SyncCounter(monkeypatch)
    argv = flags.format(sft=start / "sft").split() + QUIET + ["--out_dir", str(tmp_path)]
    if cpu_default:  # the CPU default path on a bf16 CPU: the cpu family's attention and linear+CE under autocast
        argv += ["--kernels", "auto", "--dtype", "bfloat16"]
    module.main(argv)
    if cpu_default:
        table = capsys.readouterr().out
        assert re.search(r"attention +cpu", table) and re.search(r"linear_cross_entropy +cpu", table), table
    # Steps 0 .. STEPS-2 neither log (interval 100) nor save; the last one does both.
    quiet = {s: counter.calls.get(s, []) for s in range(STEPS - 1)}
    assert quiet == {s: [] for s in range(STEPS - 1)}
    # The count can fail: the last step, which logs, does convert tensors (at least the gradient norm).
    assert "__float__" in counter.calls.get(STEPS - 1, [])
    (metrics,) = tmp_path.glob("*_metrics.jsonl")
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["step"] == STEPS and last["skipped_steps"] == 0
