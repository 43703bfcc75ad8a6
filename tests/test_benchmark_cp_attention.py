"""benchmarks/cp_attention.py (the CP attention core on one GPU): its CPU dry run writes every field, and a bad
command line is one line. Speed is never asserted (DESIGN §5)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.scripts import load_script

bench = load_script("cp_attention", "cp_attention")


def test_dry_run_times_the_three_cores_at_every_length(tmp_path):
    out = tmp_path / "out.json"
    bench.main(["--dry-run", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["env"]["functional_dry_run"] is True and report["env"]["device"].startswith("CPU")
    assert [r["length"] for r in report["records"]] == [512, 1024]
    for r in report["records"]:
        assert (r["cp"], r["rank"], r["flex_backward"]) == (2, 0, False)  # flex has no CPU backward
        assert r["gathered_tokens"] == 2 * r["local_tokens"] >= r["length"]
        assert all(r[k] > 0 for k in ("dense_ms", "flex_ms", "ideal_ms", "mask_ms", "flex_over_ideal"))
        assert 0 < r["blocks_kept"] < 1 and r["ideal_kernel"] == "MaskedDocumentAttention"  # the CPU's CP1 kernel


def test_bad_command_lines_say_what_is_wrong_in_one_line(capsys):
    for argv, says in ((["--dry-run", "--rank", "2"], "--rank 2 is not a rank of --cp 2"),
                       (["--dry-run", "--lengths", "12"], "--lengths 12 is too short"),
                       (["--dry-run", "--steps", "0"], "--steps must be at least 1"),
                       *([([], "no CUDA device")] if not torch.cuda.is_available() else [])):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert says in capsys.readouterr().err.splitlines()[-1]
