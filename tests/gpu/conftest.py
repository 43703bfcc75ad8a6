"""The GPU suite needs two CUDA devices (`ONE_GPU` files: one); without them (CI, a CPU machine) its tests are
skipped."""

import pytest
import torch

ONE_GPU = {"test_fp8_gpu.py", "test_memory_history_gpu.py"}  # files whose tests need one CUDA device, not two


def pytest_collection_modifyitems(config, items):
    found = torch.cuda.device_count()
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        if "tests/gpu/" not in path:
            continue
        needed = 1 if path.rsplit("/", 1)[-1] in ONE_GPU else 2
        if found < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA device(s), found {found}"))
