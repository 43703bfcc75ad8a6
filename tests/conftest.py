"""Suite-wide collection order: the slowest test files first, so that `pytest -n 2` ends on short files.

pyproject's addopts run each file on one worker (`--dist loadfile`) in collection order (`--no-loadscope-reorder`;
xdist's own order, most tests first, put files of a few slow tests last, leaving one core idle at the end).
"""

from __future__ import annotations

import pytest

# Ordered by each file's wall time in a `-n 2` run, slowest first (a new file of more than ~30 s belongs here);
# files not listed keep their order after these.
SLOWEST_FILES = (
    "tests/training/test_parity.py",
    "tests/test_train_cli.py",
    "tests/training/test_packing_parity.py",
    "tests/training/test_step.py",
    "tests/test_benchmark_llava15.py",
    "tests/hf/test_load_layouts.py",
    "tests/training/test_frozen_hf_checkpoint.py",
    "tests/hf/test_export.py",
    "tests/training/test_checkpoint.py",
    "tests/training/test_context_parallel.py",
    "tests/training/test_virtual_pipeline.py",
    "tests/test_benchmarks.py",
    "tests/test_train_families.py",
    "tests/test_benchmark_hf_rows.py",
    "tests/test_benchmark_deployments.py",
    "tests/test_distributed.py",
    "tests/hf/test_train_hf.py",
    "tests/training/test_qwen_parity.py",
    "tests/data/test_digits_llava.py",
    "tests/training/test_checkpoint_security.py",
    "tests/hf/test_readme.py",
    "tests/hf/test_qwen_vl_data.py",
    "tests/models/test_tensor_parallel.py",
    "tests/hf/test_generate.py",
    "tests/training/test_loop_data.py",
    "tests/hf/test_llava15_e2e.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the slowest files' tests first (a stable sort: each file's tests keep their order)."""
    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
