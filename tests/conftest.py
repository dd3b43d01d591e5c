"""Shared test setup: one thread (2 busy cores slow OpenMP 20-50x) and deterministic seeds."""
import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
