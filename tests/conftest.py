"""Test harness: Triton kernels run through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top of
the first file pytest loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that sets torch's thread count (a bench run in-process with --threads) gives it back,
    so later tests run with the count they were written for."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
