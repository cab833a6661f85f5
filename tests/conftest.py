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


@pytest.fixture(scope="session")
def tokenizer():
    """The tokenizer shipped with the project (minimind/assets/)."""
    from minimind.tokenizer import Tokenizer

    return Tokenizer.load()
