import os

import pytest
import torch

#: CI's threads mode (`make test-threads`): run the tests with exactly this many torch threads, so a test whose
#: result depends on the thread count (BLAS kernel and reduction order) fails loudly instead of on some machines.
THREADS_ENV = "MODSQUAD_TEST_THREADS"


def _forced_threads() -> int | None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return int(value)


def pytest_configure(config):
    threads = _forced_threads()
    if threads is not None:
        torch.set_num_threads(threads)


def pytest_report_header(config):
    forced = _forced_threads()
    return f"torch threads: {torch.get_num_threads()}" + (f" (forced by {THREADS_ENV})" if forced else "")


@pytest.fixture(scope="module")
def one_thread():
    """Ops on tiny (dim-32) models are so small that thread hand-offs dominate: one thread is ~3x faster here.
    Under MODSQUAD_TEST_THREADS the forced count stays, so the threads pass really runs at that count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_forced_threads() or 1)
    yield
    torch.set_num_threads(threads)
