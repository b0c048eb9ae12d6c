import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Ops on tiny (dim-32) models are so small that thread hand-offs dominate: one thread is ~3x faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
