"""Benchmark scripts (not a package: run as `python benchmarks/X.py`) loaded as modules for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str, module_name: str) -> ModuleType:
    """`benchmarks/<name>.py` as module `module_name` (registered first: dataclasses look their module up
    while a class is built)."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
