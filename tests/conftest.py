"""Fixtures shared by the test files that run real trainings."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs set torch's thread count from their config: give the next test the count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A data cache folder for the generated ``scenes`` dataset, shared by a test file."""
    return str(tmp_path_factory.mktemp("scenes_cache"))
