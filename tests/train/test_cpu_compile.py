"""--compile left unset on a CPU: pretraining compiles dense models of hidden size >= CPU_COMPILE_MIN_HIDDEN in one
process where a C++ compiler is found (train/runtime.py cpu_compile_default), and says so at start-up."""

import shutil

import pytest
import torch

from train import pretrain, runtime

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--max_seq_len", "32", "--batch_size", "2", "--max_steps", "1", "--kernels", "torch", "--dtype", "float32"]


def test_the_policy_compiles_dense_single_process_models_from_small_up(monkeypatch):
    monkeypatch.setattr(runtime, "cxx_compiler", lambda: "g++")
    assert runtime.CPU_COMPILE_MIN_HIDDEN == 512  # small's width: tiny (256) stays eager
    assert runtime.cpu_compile_default(512, use_moe=False, world_size=1)
    assert runtime.cpu_compile_default(768, use_moe=False, world_size=1)
    assert not runtime.cpu_compile_default(256, use_moe=False, world_size=1)
    assert not runtime.cpu_compile_default(640, use_moe=True, world_size=1)
    assert not runtime.cpu_compile_default(512, use_moe=False, world_size=2)
    monkeypatch.setattr(runtime, "cxx_compiler", lambda: None)
    assert not runtime.cpu_compile_default(512, use_moe=False, world_size=1)


def test_the_compiler_is_the_one_torch_compile_would_use(monkeypatch):
    found = runtime.cxx_compiler()
    assert found is None or shutil.which(found) is not None
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-compiler-here++",))
    assert runtime.cxx_compiler() is None


@pytest.mark.parametrize(
    ("flags", "compiled"),
    [(["--preset", "small"], True), (["--preset", "small", "--compile", "0"], False), (["--preset", "tiny"], False)],
)
def test_pretrain_follows_the_policy_and_says_so(flags, compiled, monkeypatch, tmp_path, capsys):
    """The decision and the start-up line; torch.compile itself is recorded, not run (a CPU compile of small costs
    ~20-30 s; the compiled path is covered by tests/minimind/test_one_graph.py and the e2e bench)."""
    monkeypatch.setattr(runtime, "cxx_compiler", lambda: "g++")
    calls = []
    monkeypatch.setattr(pretrain.torch, "compile", lambda m, **kw: calls.append(m) or m)
    pretrain.main(flags + RUN + ["--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert len(calls) == int(compiled)
    assert ("compiled (the first step compiles: ~0.5 min on a CPU; --compile 0 for eager)" in out) == compiled
