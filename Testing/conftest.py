"""Fixtures shared by every test folder (the folders' own conftest.py add theirs)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (and suffer less from a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
