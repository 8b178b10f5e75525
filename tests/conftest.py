import os

import pytest
import torch

# Two cores are shared by the whole suite; more threads only add contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path
