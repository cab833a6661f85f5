"""Shared test setup.

Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be set before any
kernel module is imported, so it is set here, first. Tests marked `gpu` run only where CUDA is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _single_torch_thread():
    """Tiny models: a second intra-op thread costs more in synchronisation than it saves, and on a shared 2-core
    machine it spins against other processes (several times slower there). The thread count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for one test."""
    yield from _single_torch_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a whole module: `pytestmark = pytest.mark.usefixtures("one_thread_module")`."""
    yield from _single_torch_thread()


@pytest.fixture(scope="session")
def tokenizer():
    """The tokenizer shipped with the project (minimind/minimind_fast/assets/)."""
    from minimind_fast.tokenizer import Tokenizer

    return Tokenizer.load()


@pytest.fixture(autouse=True, scope="session")
def _cpu_fp32():
    """The suite's expected values are fp32 ones: --dtype auto on a CPU with fast bf16 would pick bf16 autocast
    (train/runtime.py cpu_bf16_speedup), so the probe's answer is pinned to 'not faster' here; tests of the probe
    set it themselves."""
    from train import runtime

    runtime._CPU_BF16_SPEEDUP = 0.0
    yield
