"""benchmarks/validate_speed.py runs at a small size: its generated rows pass the data check, cold and then warm
(from the cache) with the same findings. Speed is never asserted (DESIGN §5)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.scripts import BENCHMARKS


def test_a_small_run_checks_every_generated_row_cold_then_warm():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "validate_speed.py"), "--rows", "300", "--images", "10",
                           "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    record = json.loads(lines[-1])
    assert (record["rows"], record["bad_rows"], record["template"]) == (300, 0, "vicuna_v1")
    assert record["cold_s"] >= 0 and record["warm_s"] >= 0 and record["mean_tokens"] > 100
    assert any(re.search(r"data\.json: 300 rows, [1-9]\d* images, 0 bad rows$", line) for line in lines), proc.stdout
