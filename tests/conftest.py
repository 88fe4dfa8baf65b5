import os
import sys

import pytest
import torch

# tests import helpers such as tests/exact_oracle.py as `from exact_oracle import ...`
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
TEST_DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture
def test_data():
    return TEST_DATA
