"""benchmarks/packing.py runs on the CPU (`--dry-run`, tiny preset) and its two rows train the same thing.

Speed is never asserted (DESIGN §5); the script's JSON must hold both rows, and the packed row must compute no
padding beyond its rounding and score the first step like the padded row (same batches, same weights).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.scripts import BENCHMARKS


def test_dry_run_writes_both_rows_with_the_same_first_loss(tmp_path):
    out = tmp_path / "packing.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "packing.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    padded, packed = results["rows"]
    assert (padded["row"], packed["row"]) == ("padded", "packed")
    assert padded["padding_fraction"] > 0.1 and packed["padding_fraction"] == 0.0  # CPU rows: multiple 1
    assert abs(packed["loss_first_step"] - padded["loss_first_step"]) <= 1e-5 * padded["loss_first_step"]
    assert packed["speedup_real_tokens_per_s"] > 0 and "| tiny packed | 2 |" in proc.stdout
    assert packed["graphs_after_warmup"] == 0  # eager: nothing compiles
