"""The GPU suite needs two CUDA devices; without them (CI, a CPU machine) every test here is skipped."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.device_count() >= 2:
        return
    skip = pytest.mark.skip(reason=f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
