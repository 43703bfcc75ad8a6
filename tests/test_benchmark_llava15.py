"""benchmarks/llava15.py: its CPU dry run trains stage 1, then stage 2 from stage 1's checkpoint, and reports both.

Speed is never asserted (DESIGN §5). One dry run (tiny preset, gloo, 2 processes, two `mimo train` runs) is
shared by the tests that need it; the others check the script's parts without launching anything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import yaml

from tests.scripts import BENCHMARKS, load_script

bench = load_script("llava15", "llava15_bench")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava15")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "llava15.py"), "--dry-run", "--out", str(out),
                           "--json", str(out / "llava15.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(r["stage"], r["layout"]): r for r in json.loads((out / "llava15.json").read_text())["rows"]}
    return out, proc.stdout, rows


def test_both_stages_train_and_report_samples_per_gpu(dry_run):
    out, stdout, rows = dry_run
    assert list(rows) == [(1, "yaml"), (2, "yaml")]
    for (stage, layout), r in rows.items():
        assert "error" not in r, r
        assert r["gpus"] == 2 and r["steps_timed"] == 2 and r["global_batch"] == 8
        assert r["samples_per_s_per_gpu"] > 0 and r["samples_per_s"] == pytest.approx(2 * r["samples_per_s_per_gpu"])
        assert r["vs_anchor"] == pytest.approx(r["samples_per_s_per_gpu"] / bench.ANCHOR[stage])
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["skipped_samples"] == 0  # every generated sample fits the model
        assert f"| {stage} | {layout} | 2 | 2 |" in stdout
    assert "not a measurement" in stdout
    # the runs are the examples' own, changed only by --set: stage 1 scores captions, stage 2 packs
    config = [yaml.safe_load((out / "runs" / f"stage{s}-yaml" / "config.yaml").read_text()) for s in (1, 2)]
    assert [c["data"]["template"] for c in config] == ["plain", "vicuna_v1"]
    assert config[0]["model"]["freeze_language_model"] and not config[1]["model"]["freeze_language_model"]
    assert config[1]["data"]["packing"] and config[1]["distributed"]["language"]["data_parallel"] == "fsdp"


def test_stage2_starts_from_stage1s_checkpoint(dry_run):
    out, _, rows = dry_run
    stage1, stage2 = rows[(1, "yaml")], rows[(2, "yaml")]
    checkpoint = Path(stage1["stage1_checkpoint"])
    assert checkpoint == out / "runs" / "stage1-yaml" / "checkpoints" / "step_00000003"
    assert (checkpoint / "COMPLETE").is_file()  # kept: a later call's stage 2 may start from it
    assert stage2["pretrained_from"] == str(checkpoint)  # mimo train's line, printed after the weights loaded
    run2 = out / "runs" / "stage2-yaml"
    assert yaml.safe_load((run2 / "config.yaml").read_text())["checkpoint"]["final"] is False
    assert [p.name for p in (run2 / "checkpoints").iterdir()] == [".lock"]  # checkpoint.final=false: 82 GB not written


def test_data_and_models_have_the_recipes_form(dry_run):
    out, _, _ = dry_run
    stage1 = json.loads((out / "data" / "stage1.json").read_text())
    stage2 = json.loads((out / "data" / "stage2.json").read_text())
    assert len(stage1) == len(stage2) == 8 * 3
    assert all(e["image"].endswith(".jpg") and len(e["conversations"]) == 2 for e in stage1)
    captions = [len(e["conversations"][1]["value"].split()) for e in stage1]
    assert 35 < sum(captions) / len(captions) < 70
    assert any("image" not in e for e in stage2) and any(len(e["conversations"]) > 2 for e in stage2)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "models" / "vicuna" / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 256  # the tiny language model's vocabulary (Vicuna-7B's: 32000)
    caption = stage1[0]["conversations"][1]["value"]
    assert len(tokenizer.encode(caption).ids) == len(caption.split()) + 1  # one token a word, and <s>
    assert json.loads((out / "models" / "clip" / "preprocessor_config.json").read_text())["do_center_crop"]


def test_every_layout_passes_mimo_validate(dry_run):
    out, _, _ = dry_run
    args = bench.parse_args(["--dry-run", "--out", str(out), "--layouts", ",".join(bench.LAYOUTS)])
    assert bench.preflight(args) == []  # both stages: keys, layout, micro-batches, model split, data, world size


def test_a_layout_mimo_refuses_stops_the_call_before_any_run(dry_run, monkeypatch, capsys):
    out, _, _ = dry_run
    bad = bench.Layout(2, "TP3 encoder", images={"tensor_model_parallel_size": 3, "data_parallel_size": 1})
    monkeypatch.setitem(bench.LAYOUTS, "bad", bad)
    with pytest.raises(SystemExit) as e:
        bench.main(["--dry-run", "--out", str(out), "--layouts", "bad", "--stages", "1"])
    assert e.value.code == 2
    assert "llava15.py: error: stage 1 bad: modules 'language' (ranks 0-1) and 'images' (ranks 0-2)" in \
        capsys.readouterr().err
    assert not (out / "runs" / "stage1-bad.log").exists()


def test_layouts_keep_the_yamls_micro_batch_per_rank():
    base = {s: bench.stage_yaml(s) for s in (1, 2)}
    assert bench.LAYOUTS["yaml"].overrides(base[1], 1) == []
    one = bench.LAYOUTS["one"].overrides(base[2], 2)
    assert "train.num_microbatches=32" in one and "distributed.language.data_parallel=ddp" in one
    assert "train.num_microbatches=16" in bench.LAYOUTS["hetero1+1"].overrides(base[1], 1)
    # Vicuna-7B trains on one GPU (one, and hetero1+1's language GPU) only with recomputed activations
    for name in ("one", "hetero1+1"):
        assert "train.recompute_granularity=full" in bench.LAYOUTS[name].overrides(base[2], 2)
        assert "train.recompute_granularity=full" not in bench.LAYOUTS[name].overrides(base[1], 1)
    for name, layout in bench.LAYOUTS.items():
        sets = dict(s.split("=", 1) for s in layout.overrides(base[2], 2))
        if "parallelism.language" in sets:
            language = yaml.safe_load(sets["parallelism.language"])
            assert layout.gpus == max(language.get("rank_offset", 0) + 1, language["data_parallel_size"] *
                                      language.get("tensor_model_parallel_size", 1)), name


def test_a_layout_runs_only_in_the_stages_it_is_a_candidate_for():
    args = bench.parse_args(["--layouts", "yaml,fsdp2", "--stages", "1,2"])
    assert bench.rows_asked(args) == [(1, "yaml"), (1, "fsdp2"), (2, "yaml")]  # stage 2's yaml is FSDP2 already


def test_unknown_layout_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--layouts", "yaml,tp8"])
    assert e.value.code == 2 and "unknown ['tp8']" in capsys.readouterr().err


def test_a_row_past_the_time_limit_is_stopped():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    start = time.time()
    assert bench.wait_or_stop(proc, start + 0.5) == "stopped at --time-limit"
    assert proc.returncode is not None and time.time() - start < 30


def test_rows_of_an_earlier_call_are_kept_unless_rerun(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": [{"stage": 1, "layout": "yaml", "x": 1}, {"stage": 2, "layout": "yaml"}]}))
    merged = bench.merged_rows(path, [{"stage": 1, "layout": "yaml", "x": 2}])
    assert merged == [{"stage": 2, "layout": "yaml"}, {"stage": 1, "layout": "yaml", "x": 2}]


def test_gpu_memory_keeps_each_gpus_peak(tmp_path, monkeypatch):
    """nvidia-smi cannot exist here (no GPU): a stand-in prints what the real one does, GPU 0's figure rising
    on its second call and falling after it; the peak must be kept, not the last figure."""
    calls = tmp_path / "calls"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho x >> {calls}\nn=$(wc -l < {calls})\n"
                   f"if [ $n -eq 2 ]; then echo '0, 3072'; elif [ $n -eq 1 ]; then echo '0, 1024'; "
                   f"else echo '0, 512'; fi\necho '1, 2048'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with bench.GpuMemory() as memory:
        give_up = time.time() + 60
        while time.time() < give_up and (not calls.exists() or len(calls.read_text().split()) < 4):
            time.sleep(0.1)  # a poll every 2 s: the fourth has started, so the third has been read
    assert memory.peaks == {0: 3.0, 1: 2.0}


def test_extra_overrides_come_last_and_are_checked_before_any_run(tmp_path, capsys):
    args = bench.parse_args(["--out", str(tmp_path), "--layouts", "one", "--stages", "2",
                             "--set", "train.recompute_granularity=full", "--set", "train.num_microbatches=16"])
    sets = bench.row_overrides(2, bench.LAYOUTS["one"], args, tmp_path / "run", None)
    assert sets[-2:] == ["train.recompute_granularity=full", "train.num_microbatches=16"]  # after the layout's 32
    bad = bench.parse_args(["--dry-run", "--out", str(tmp_path), "--layouts", "one", "--stages", "1",
                            "--set", "train.recompute_granularity=some"])
    assert any("train.recompute_granularity: 'some' is not allowed" in p for p in bench.preflight(bad))


def test_a_row_stopped_at_its_deadline_is_resumed_by_the_next_call(dry_run, tmp_path, capsys):
    """--resume (curves longer than one call): the first call's row stops after step 1 with a checkpoint (its
    deadline, here passed at once), the next call continues it to the end: the whole run's losses are the
    uninterrupted dry run's, the timed steps the second call's own."""
    out, json_path = tmp_path / "out", tmp_path / "rows.json"
    shutil.copytree(dry_run[0] / "models", out / "models")  # written once, as a warm machine keeps them
    call = [sys.executable, str(BENCHMARKS / "llava15.py"), "--dry-run", "--out", str(out), "--stages", "1",
            "--resume", "--json", str(json_path)]
    first = subprocess.run([*call, "--set", "train.exit_duration_in_mins=0.0001"], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    (row,) = json.loads(json_path.read_text())["rows"]
    assert row["stopped"] == "stopped after step 1 at --time-limit: --resume continues" and row["steps_logged"] == 1
    assert "stage1_checkpoint" not in row  # a stopped stage 1 is no stage 2's source, in this call or a later one
    assert bench.earlier_stage1(out) is None
    second = subprocess.run(call, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    (row,) = json.loads(json_path.read_text())["rows"]
    assert row["resumed_at"] == 1 and "stopped" not in row and row["steps_timed"] == 1  # steps 2 (warm-up), 3
    assert row["losses"] == pytest.approx(dry_run[2][(1, "yaml")]["losses"], rel=1e-6)
    assert bench.earlier_stage1(out) == out / "runs" / "stage1-yaml" / "checkpoints" / "step_00000003"
    # a third call finds the run finished: not run again (its row stays the second call's); it launches nothing,
    # so it runs in this process
    capsys.readouterr()
    bench.main(call[2:])
    assert "# stage 1 yaml: finished in an earlier call" in capsys.readouterr().out
    assert json.loads(json_path.read_text())["rows"] == [row]


def test_a_failed_resumed_stage1_row_is_no_stage2_source(tmp_path):
    """Under --resume a stage-1 row that fails (out of memory, a refused resume) keeps its run directory, with an
    earlier call's checkpoint of a step before the last: that is no stage 2's source."""
    run_dir = tmp_path / "runs" / "stage1-yaml"
    (run_dir / "checkpoints" / "step_00000100").mkdir(parents=True)  # the earlier call stopped there, of 200
    (run_dir / "checkpoints" / "step_00000100" / "COMPLETE").write_text("{}")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 200}}))
    row = {"run_dir": str(run_dir), "error": "RuntimeError: CUDA out of memory"}
    assert bench.keep_or_drop(row, None, keep_all=True) is None and "stage1_checkpoint" not in row
    (run_dir / "checkpoints" / "step_00000200").mkdir()  # a finished run's last checkpoint is
    (run_dir / "checkpoints" / "step_00000200" / "COMPLETE").write_text("{}")
    assert bench.keep_or_drop({"run_dir": str(run_dir)}, None, keep_all=True) == run_dir / "checkpoints" / \
        "step_00000200"


def test_a_resumable_row_stops_in_time_to_checkpoint_before_the_limit():
    args = bench.parse_args(["--resume"])
    now = time.time()
    (stop,) = bench.stop_before(now + 1000.0, 2, resumable=True)
    minutes = float(stop.removeprefix("train.exit_duration_in_mins="))
    assert minutes * 60 == pytest.approx(1000.0 - bench.SAVE_S[2], abs=2.0)
    assert bench.stop_before(now + 1000.0, 2, resumable=False) == []  # a speed row is stopped at the limit
    assert bench.stop_before(math.inf, 1, resumable=args.resume) == []  # no limit, no deadline
    tight = now + bench.START_S + bench.SAVE_S[2] - 5
    assert bench.why_not_run(2, Path("x"), tight, resumable=True).startswith("not run: ")  # too little time
    assert bench.why_not_run(2, Path("x"), tight, resumable=False) is None  # a speed row is stopped at the limit


def test_an_fp8_variant_of_a_layout_sets_fp8_and_is_compared_with_its_bf16_row():
    """`one+fp8` is `one` with the language model in fp8 (its own run); the report compares the two rows."""
    layout = bench.layout_of("one+fp8row")
    assert layout.overrides(bench.stage_yaml(2), 2)[-1] == "distributed.language.fp8=rowwise"
    assert layout.gpus == 1 and "fp8 rowwise" in layout.what
    assert bench.layout_of("hetero1+1").settings == () and bench.fp8_variant("hetero1+1") == ("hetero1+1", None)
    rows = [{"stage": 2, "layout": "one+fp8", "samples_per_s": 15.0, "losses": [9.0] + [2.02] * 50},
            {"stage": 2, "layout": "one", "samples_per_s": 12.5, "losses": [9.0] + [2.0] * 50}]
    assert bench.fp8_comparisons(rows) == ["", "stage 2 one+fp8 vs one: samples/s x1.200; mean loss over the last "
                                               "50 steps 2.0200 vs 2.0000, relative difference 1.00%"]
    assert [r["layout"] for r in sorted(rows, key=lambda r: bench.layout_order(r["layout"]))] == ["one", "one+fp8"]


def test_stage2_alone_starts_from_the_seed_and_two_calls_compare(dry_run, tmp_path, capsys):
    """`--stage1-from none` (a curve in one cold call): stage 2 trains from the projector's seeded initial values,
    the row says so, and `--compare` of two calls' JSONs reports the loss difference and that they started alike."""
    out, first = tmp_path / "out", tmp_path / "one.json"
    shutil.copytree(dry_run[0] / "models", out / "models")
    bench.main(["--dry-run", "--out", str(out), "--stages", "2", "--layouts", "one", "--stage1-from", "none",
                "--warmup", "1", "--steps", "1", "--json", str(first), "--set", "train.global_batch_size=4",
                "--set", "train.num_microbatches=1"])  # the smallest step (the curves' commands shrink the batch too)
    assert "| 2 | one | 1 | 1 |" in capsys.readouterr().out
    (row,) = json.loads(first.read_text())["rows"]
    assert "error" not in row and len(row["losses"]) == 2 and row["pretrained_from"] is None
    assert row["start"]["stage1"] is None and row["start"]["seed"] == 0
    assert [n.rsplit(".", 2)[-2] for n in row["start"]["seeded"]["parameters"]] == ["fc1", "fc1", "fc2", "fc2"]
    run = yaml.safe_load((out / "runs" / "stage2-one" / "config.yaml").read_text())
    assert run["checkpoint"]["pretrained_checkpoint"] is None
    assert not (out / "data" / "stage1.json").exists()  # only the asked stage's data is written
    second = tmp_path / "fp8.json"  # as an fp8 call's row would come back: its own layout, its own losses
    second.write_text(json.dumps({"rows": [{**row, "layout": "one+fp8", "losses": [x * 1.01 for x in row["losses"]]}]}))
    bench.main(["--compare", str(first), str(second)])
    text = capsys.readouterr().out
    assert "no stage 1: projector at its seeded initial values (train.seed 0, sha256 " in text
    assert "stage 2 one+fp8 vs one: samples/s x1.000; mean loss over the last 2 steps" in text
    assert "relative difference 1.00%; same start (seed, models, data, seeds)" in text
    with pytest.raises(SystemExit, match="--compare .*none.json: not a --json file of this script"):
        bench.main(["--compare", str(first), str(tmp_path / "none.json")])


def test_both_curves_start_from_weights_that_depend_on_the_seed_only(dry_run, tmp_path):
    """Two cold calls (bf16, fp8) must start alike: the models written again elsewhere are the same bytes, every
    layout and precision seeds the same projector values, the model mimo builds holds exactly those, and another
    train.seed gives others."""
    from mimo.hf.load import fingerprint
    from mimo.training.plan import plan_model
    from mimo.training.run_config import load_run_config

    out = dry_run[0]
    bench.write_pair("tiny", tmp_path / "clip", tmp_path / "vicuna")
    for part in ("clip", "vicuna"):
        assert fingerprint(tmp_path / part) == fingerprint(out / "models" / part)
        assert (tmp_path / part / "model.safetensors").read_bytes() == \
            (out / "models" / part / "model.safetensors").read_bytes()

    def starts(*extra: str) -> dict[str, dict]:
        args = bench.parse_args(["--dry-run", "--out", str(out), "--stages", "2", "--stage1-from", "none",
                                 "--set", "train.dtype=bfloat16", *extra])  # fp8 needs bfloat16
        return {n: bench.start_record(2, n, args, None) for n in ("one", "one+fp8", "yaml")}

    first = starts()
    assert first["one"] == first["one+fp8"] == first["yaml"]
    other = starts("--set", "train.seed=1")["one"]
    assert bench.start_difference(first["one"], other) == "seed, seeded"
    args = bench.parse_args(["--dry-run", "--out", str(out), "--stages", "2", "--stage1-from", "none"])
    plan = plan_model(load_run_config(bench.EXAMPLES / "llava15_stage2.yaml",
                                      bench.row_overrides(2, bench.layout_of("one"), args, tmp_path / "run", None)))
    params = dict(plan.whole_model_provider().provide().named_parameters())
    built = bench.hashlib.sha256()
    for name in first["one"]["seeded"]["parameters"]:
        built.update(name.encode())
        built.update(params[name].detach().numpy().tobytes())
    assert built.hexdigest() == first["one"]["seeded"]["sha256"]


def test_language_layers_writes_the_first_n_decoder_layers_only(tmp_path, capsys):
    """`--language-layers N` (the 7B's shapes on a GPU too small for all 32 layers): the Vicuna folder's config and
    weights hold N layers, the tower all of its; N must be positive."""
    assert bench.parse_args(["--language-layers", "12"]).language_layers == 12
    with pytest.raises(SystemExit):
        bench.parse_args(["--language-layers", "0"])
    assert "--language-layers" in capsys.readouterr().err
    bench.write_models("tiny", tmp_path, 1)
    config = json.loads((tmp_path / "vicuna" / "config.json").read_text())
    names = safetensors.safe_open(next((tmp_path / "vicuna").glob("*.safetensors")), "pt").keys()
    assert config["num_hidden_layers"] == 1
    assert {n.split(".")[2] for n in names if ".layers." in n} == {"0"}
