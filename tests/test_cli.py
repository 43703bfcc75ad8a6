"""`mimo layout`: the rank map of every shipped example, and a one-line error for every broken file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mimo.cli import main

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ROOT / "examples" / "layouts"
EXAMPLES = sorted(LAYOUTS.glob("*.yaml"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"homogeneous", "colocated", "heterogeneous", "stub_ranks"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_prints_its_rank_map(capsys, path):
    code, out, err = run(capsys, "layout", str(path))
    assert code == 0, err
    world = int(out.split("world size ")[1].split(",")[0])
    rank_lines = out.split("roles\n")[1].strip().splitlines()
    assert sorted({int(line.split()[0]) for line in rank_lines}) == list(range(world))


def test_heterogeneous_rank_map(capsys):
    code, out, _ = run(capsys, "layout", str(LAYOUTS / "heterogeneous.yaml"))
    assert code == 0
    assert "world size 8, deployment heterogeneous" in out
    assert "language  TP2 x PP2 x DP1 on ranks 2-5" in out
    assert "   5  language   1   0   0   1  last stage, embd" in out
    assert "edges: images -> language, audio -> language" in out


def test_context_parallel_rank_map(capsys):
    """`mimo layout` shows CP in the module line and each rank's cp coordinate; an encoder's CP is one line."""
    code, out, _ = run(capsys, "layout", str(LAYOUTS / "context_parallel.yaml"))
    assert code == 0
    assert "language  TP1 x CP2 x DP2 on ranks 0-3" in out
    assert "   1  language   0   0   1   0" in out and "   2  language   0   1   0   0" in out


def test_stub_ranks_warn_and_show(capsys):
    code, out, err = run(capsys, "layout", str(LAYOUTS / "stub_ranks.yaml"))
    assert code == 0
    assert "stub ranks: 0" in out
    assert "   0  stub" in out
    assert err.startswith("warning: rank 0 before the first module 'images'")


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "layout.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("text", "argv", "message"),
    [
        (None, [], "no such file"),
        ("parallelism: [", [], "not valid YAML"),
        ("- 1\n- 2\n", [], "expected a mapping at the top level, got list"),
        ("parallelism: {language: {}}\nsteps: 3\n", [], r"unknown top-level key(s) ['steps']; allowed keys"),
        ("parallelism: {language: {data_parallel_size: 1}}\ntrain: {steps: 3}\n", [], None),
        ("world_size: 2\n", [], "missing 'parallelism'"),
        ("parallelism: {language: {tensor_model_parallel_size: 2}}\n", [],
         "modules ['language'] leave data_parallel_size to be derived, so the layout does not say its world size"),
        ("parallelism: {language: {tp: 2}}\n", [], "module 'language': unknown key(s) ['tp']"),
        ("parallelism: {images: {context_parallel_size: 2}, language: {}}\nworld_size: 2\n",
         [], "module 'images': context_parallel_size=2 is supported for a modality module only in a homogeneous"),
        ("parallelism: {images: {data_parallel_size: 2}, language: {data_parallel_size: 2, rank_offset: 1}}\n",
         [], "partially overlap"),
        ("parallelism: {language: {data_parallel_size: 2}}\n", ["--world-size", "3"],
         "rank 2 after the last module 'language'"),
        ("parallelism: {language: {data_parallel_size: 1}}\n", ["--world-size", "1"], None),
    ],
)
def test_broken_files_give_one_line_and_exit_2(capsys, tmp_path, text, argv, message):
    path = str(tmp_path / "missing.yaml") if text is None else write(tmp_path, text)
    code, out, err = run(capsys, "layout", path, *argv)
    if message is None:
        assert code == 0
        return
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("mimo layout: error: ")
    assert message in err


def test_bad_world_size_argument(capsys):
    with pytest.raises(SystemExit) as e:
        main(["layout", str(LAYOUTS / "colocated.yaml"), "--world-size", "0"])
    assert e.value.code == 2
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_a_huge_world_size_is_refused_at_once(capsys):
    """Issue 17: --world-size 100000000 grew past 11 GB; now one line naming the cap."""
    code, out, err = run(capsys, "layout", str(LAYOUTS / "colocated.yaml"), "--world-size", "100000000")
    assert code == 2 and out == ""
    assert err == "mimo layout: error: world_size must be an integer from 1 to 131072, got 100000000\n"


def test_console_script_runs_without_traceback():
    ok = subprocess.run([sys.executable, "-m", "mimo", "layout", str(LAYOUTS / "colocated.yaml")],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "deployment colocated" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mimo", "layout", str(LAYOUTS / "colocated.yaml"),
                          "--world-size", "3"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("mimo layout: error: ")


def test_version(capsys):
    import mimo

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"mimo {mimo.__version__}\n"
