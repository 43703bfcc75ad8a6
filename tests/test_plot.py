"""`mimo.plot` and `mimo plot`: a PNG for one run and for several, the default output paths, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mimo.cli import main as cli_main
from mimo.plot import PlotError, default_output, plot_runs, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def main(argv: list[str]) -> int:
    """`mimo plot ARGV`, as the command line runs it."""
    return cli_main(["plot", *argv])


def make_run(path: Path, steps: int = 20, with_eval: bool = True, cut_last_line: bool = False) -> Path:
    """A run directory with a metrics.jsonl like MetricsWriter's (train lines, some eval lines)."""
    path.mkdir(parents=True)
    records = [{"kind": "train", "step": s, "loss": 3.0 / s, "tokens_per_s": 1000.0 + 10 * s}
               for s in range(1, steps + 1)]
    if with_eval:
        records += [{"kind": "eval", "step": s, "loss": 3.2 / s, "accuracy": s / steps} for s in (5, 10, 20)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (path / "metrics.jsonl").write_text(text + ('{"kind": "train", "st' if cut_last_line else ""))
    return path


def assert_png(path: Path) -> None:
    """A real PNG of some size (two panels of lines are tens of kB; an empty canvas would be far smaller)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_one_run(tmp_path) -> None:
    """One run with eval points; the returned path is the file written."""
    run = make_run(tmp_path / "run_a")
    out = plot_runs([run], tmp_path / "out" / "a.png")
    assert out == tmp_path / "out" / "a.png"
    assert_png(out)


def test_two_runs_one_without_eval(tmp_path) -> None:
    """Two runs, only one with evaluations; a run still writing (cut last line) plots what it has."""
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", steps=12, with_eval=False, cut_last_line=True)
    assert len(read_metrics(b)) == 12
    assert_png(plot_runs([a, b], tmp_path / "cmp.png"))


def test_main_default_outputs(tmp_path, monkeypatch, capsys) -> None:
    """One run: RUN_DIR/plot.png; several: ./comparison.png; --out wins."""
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    assert main([str(a)]) == 0
    assert_png(a / "plot.png")
    assert main([str(a), str(b)]) == 0
    assert_png(tmp_path / "comparison.png")
    assert main([str(a), "--out", str(tmp_path / "x.png")]) == 0
    assert_png(tmp_path / "x.png")
    assert f"wrote {tmp_path / 'x.png'}" in capsys.readouterr().out
    assert default_output([a]) == a / "plot.png" and default_output([a, b]) == Path("comparison.png")


def test_errors(tmp_path, capsys) -> None:
    """Missing file, empty file, a broken line in the middle: one clear line each, exit 2, no PNG."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "evalonly").mkdir()
    (tmp_path / "evalonly" / "metrics.jsonl").write_text('{"kind": "eval", "step": 1, "accuracy": 0.5}\n')
    (tmp_path / "file").write_text("")
    cases = {
        "missing": "metrics.jsonl: no such file; is ",
        "empty": "no training steps logged yet",
        "evalonly": "no training steps logged yet",
    }
    for name, message in cases.items():
        with pytest.raises(PlotError, match=message):
            plot_runs([tmp_path / name], tmp_path / f"{name}.png")
        assert main([str(tmp_path / name), "--out", str(tmp_path / f"{name}.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mimo plot: error: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / f"{name}.png").exists()
    with pytest.raises(PlotError, match="no run directories"):
        plot_runs([], tmp_path / "none.png")
    # --out under a file (issue 17's probe): one line, not a traceback
    run = make_run(tmp_path / "run")
    assert main([str(run), "--out", str(tmp_path / "file" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mimo plot: error: cannot write {tmp_path / 'file' / 'x.png'}: ") and err.count("\n") == 1


def test_bad_records_are_skipped_and_named_in_one_line(tmp_path, capsys) -> None:
    """Issue 17's probes: a record that is a list, one without `step`, a line that is not JSON (mid-file)."""
    run = tmp_path / "bad"
    run.mkdir()
    good = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    lines = [good[0], "[1, 2]", good[1], '{"kind": "train", "loss": 0.7}', "not json", good[2]]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as caught:
        assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert len(caught) == 1
    assert str(caught[0].message) == (f"{run / 'metrics.jsonl'}: skipped 3 bad record(s): line 2 (a JSON list, not "
                                      f"an object), line 4 (no integer step), line 5 (not JSON: Expecting value)")
    assert main([str(run), "--out", str(tmp_path / "bad.png")]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: {caught[0].message}\n" and "wrote " in out
    assert_png(tmp_path / "bad.png")


def test_out_without_an_image_suffix_reports_the_file_it_wrote(tmp_path, capsys) -> None:
    """Issue 27: `--out DIR` wrote `DIR.png` but said "wrote DIR"; an existing directory gets `plot.png` inside."""
    a = make_run(tmp_path / "a")
    assert main([str(a), "--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'report.png'}\n"
    assert_png(tmp_path / "report.png")
    (tmp_path / "plots").mkdir()
    assert main([str(a), "--out", str(tmp_path / "plots")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'plots' / 'plot.png'}\n"
    assert_png(tmp_path / "plots" / "plot.png")


def test_held_out_scores_are_drawn(tmp_path, monkeypatch) -> None:
    """A run's eval records with exact match and token accuracy (`eval.generate`) show both on the right axis."""
    from matplotlib.figure import Figure

    run = make_run(tmp_path / "run", with_eval=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "eval", "step": 10, "loss": 0.5, "exact_match": 0.25, "token_accuracy": 0.5}))
    drawn = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.setdefault("fig", fig))
    plot_runs([run], tmp_path / "out.png")
    legend = [t.get_text() for t in drawn["fig"].axes[0].get_legend().get_texts()]
    assert legend == ["run", "run (eval)", "run exact match (eval)", "run token accuracy (eval)"]
