"""The check of a whole LLaVA-format file before launch (`mimo.data.scan`): every row's shape, images and token count,
equal to what training builds; `mimo validate` prints what it found, and `mimo train`'s parent refuses a file with
more bad rows than `data.max_bad_sample_rate` in one line, before any worker or run directory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mimo.data import scan as scan_module
from mimo.data.scan import RowRules, file_facts, read_rows, row_facts
from mimo.data.templates import VicunaV1Template
from tests.data.llava_files import TOKENS_PER_IMAGE, open_dataset, pretrain_entry, save_image
from tests.data.test_llava import INSTRUCT, MESSAGES
from tests.test_train_cli import in_process, write_config

LAYOUT = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 1}}
TWO_IMAGES = {"images": ["a.png", "b.png"], "conversations": [
    {"from": "human", "value": "look at this <image> and <image>"}, {"from": "gpt", "value": "same"},
    {"from": "human", "value": "no"}, {"from": "gpt", "value": "a cat and a dog"}]}
TEXT_ONLY = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}


def bad_rows_file(tmp_path: Path) -> Path:
    """A JSONL file of 7 rows (a blank line among them): 2 good, 5 bad, one of each reason."""
    for name in ("0.png", "1.png"):
        save_image(tmp_path / "images" / name)
    lines = [json.dumps(pretrain_entry("0.png", "a cat")),
             '{"image": "1.png", "conversations": [',  # line 2: not JSON
             json.dumps({"conversations": [{"from": "gpt", "value": "a cat"}]}),  # 3: malformed
             "",
             json.dumps(pretrain_entry("nope.png")),  # 5: image missing
             json.dumps(pretrain_entry("../0.png")),  # 6: leaves the folder
             json.dumps(pretrain_entry("1.png", " ".join(["cat"] * 300))),  # 7: too long for 256
             json.dumps(TEXT_ONLY)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validate_prints_what_the_whole_file_holds_and_train_refuses_it(tmp_path, monkeypatch):
    from tests.training.test_llava_data import llava_files

    monkeypatch.setenv("MIMO_CACHE_DIR", str(tmp_path / "cache"))

    data = {**llava_files(tmp_path), "path": str(bad_rows_file(tmp_path))}
    config, run_dir = write_config(tmp_path, data=data, parallelism=LAYOUT)
    done = in_process("validate", str(config), "--set", "data.max_bad_sample_rate=1")
    assert done.returncode == 0, done.stderr
    path = data["path"]
    lines = done.stdout.splitlines()
    assert lines[:11] == [
        f"{path}: 7 rows, 4 images, 5 bad rows",
        "  not valid JSON: 1", f"    {path}:2: Expecting value at column 38",
        "  malformed conversation: 1",
        f"    {path}:3: turns must alternate user, assistant (after an optional system turn) and end with the "
        f"assistant; got ['assistant']",
        "  image file not found: 1", f"    {path}:5: {tmp_path}/images/nope.png",
        "  image path leaves data.image_folder: 1", f"    {path}:6: ../0.png",
        "  too long: 1", f"    {path}:7: 324 tokens, more than max_seq_len=256"]
    # the tiny preset: 16 tokens an image; the rows that tokenized (the good ones' 26 and 9 tokens, the one without
    # its image's 26, the long one's 324) in 8 bins
    assert lines[11] == "tokens per row (max_seq_len 256): min 9, mean 96, max 324"
    assert lines[12].split() == ["0-41", "3", "#" * 40] and lines[19].split() == ["287-324", "1", "#" * 13]
    assert "warning: data: 5 of 7 rows of" in done.stderr and "(71.43%) are bad and will be skipped" in done.stderr

    refusal = (f"data.path: 5 of 7 rows of {path} (71.43%) are bad, more than data.max_bad_sample_rate 0.01 allows: "
               f"not valid JSON: 1 (e.g. {path}:2: Expecting value at column 38); malformed conversation: 1 (e.g. ")
    validated = in_process("validate", str(config))
    assert validated.returncode == 2 and validated.stderr.startswith(f"mimo validate: error: {refusal}")
    assert validated.stderr.count("\n") == 1 and validated.stdout.startswith(f"{path}: 7 rows")
    trained = in_process("train", str(config))
    assert trained.returncode == 2 and trained.stderr.startswith(f"mimo train: error: {refusal}")
    assert trained.stderr.count("\n") == 1 and not run_dir.exists()
    # with on_bad_sample error, one bad row is refused: the run would stop on it
    data["path"] = str(tmp_path / "one_bad.json")
    Path(data["path"]).write_text(json.dumps([pretrain_entry("0.png")] * 199 + [pretrain_entry("nope.png")]))
    config, _ = write_config(tmp_path, data={**data, "on_bad_sample": "error"}, parallelism=LAYOUT)
    stopped = in_process("train", str(config))
    assert stopped.returncode == 2 and stopped.stderr.startswith(
        f"mimo train: error: data.path: 1 of 200 rows of {data['path']} (0.50%) are bad, and data.on_bad_sample is "
        f"error: image file not found: 1 (e.g. {data['path']}[199]: {tmp_path}/images/nope.png); fix them or set "
        f"data.on_bad_sample: skip")
    assert in_process("validate", str(config), "--set", "data.on_bad_sample=skip").returncode == 0  # 0.5% < 1%


@pytest.mark.parametrize("template", ["chat", "vicuna_v1", "plain"])
def test_token_counts_are_the_training_samples_lengths_in_parallel_too(tmp_path, monkeypatch, template):
    """Each good row's count equals the length of the sample training builds from it (images expanded); the
    forked scanners find what one process finds."""
    for name in ("a.png", "b.png"):
        save_image(tmp_path / "images" / name)
    entries = [INSTRUCT, MESSAGES, TWO_IMAGES, TEXT_ONLY, pretrain_entry("a.png", "a dog and a cat")] * 3
    if template == "plain":
        entries = [pretrain_entry("a.png", " ".join(["a cat"] * k)) for k in range(1, 12)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([*entries, pretrain_entry("gone.png")]))
    data = open_dataset(tmp_path, path, template=template)
    rules = RowRules(data.prompter, data.template, TOKENS_PER_IMAGE, 64, tmp_path / "images")
    alone = row_facts(*read_rows(path), path, rules, workers=1)
    scan = alone.judged(rules)
    assert list(scan.lengths)[:-1] == [len(data[k].input_ids) for k in range(len(entries))]
    assert scan.bad == {"image file not found": 1} and scan.images == sum(
        len(e.get("images", [e["image"]] if "image" in e else [])) for e in entries) + 1
    monkeypatch.setattr(scan_module, "PARALLEL_ROWS", 1)
    monkeypatch.setattr(scan_module, "BATCH", 2)
    assert row_facts(*read_rows(path), path, rules, workers=2) == alone


def test_a_file_s_facts_are_cached_and_judged_against_the_disk_anew(tmp_path, monkeypatch):
    """The second check of a file reads its facts back (the file is not parsed again); its images are looked up
    again; a changed file, tokenizer or template is checked anew."""
    for name in ("a.png", "b.png"):
        save_image(tmp_path / "images" / name)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in [INSTRUCT, TWO_IMAGES, TEXT_ONLY, "not a row"]))
    data = open_dataset(tmp_path, path)
    rules = RowRules(data.prompter, data.template, TOKENS_PER_IMAGE, 64, tmp_path / "images")
    cache = tmp_path / "cache"
    first = file_facts(path, rules, cache=cache)
    assert len(list(cache.glob("*.pt"))) == 1 and first.judged(rules).bad == {"malformed conversation": 1}

    def unread(*args):
        raise AssertionError("the file was read again")
    monkeypatch.setattr(scan_module, "read_rows", unread)
    again = file_facts(path, rules, cache=cache)
    assert again == first and again.head == [INSTRUCT, TWO_IMAGES, TEXT_ONLY, "not a row"]
    (tmp_path / "images" / "b.png").unlink()
    assert again.judged(rules).bad == {"malformed conversation": 1, "image file not found": 1}
    monkeypatch.undo()
    path.write_text(path.read_text().replace("a cat", "a dog"))
    assert file_facts(path, rules, cache=cache) != first  # the same size, another time and other bytes
    vicuna = RowRules(data.prompter, VicunaV1Template(), TOKENS_PER_IMAGE, 64, tmp_path / "images")
    assert file_facts(path, vicuna, cache=cache).tokens != first.tokens
    assert len(list(cache.glob("*.pt"))) == 3


def test_a_json_syntax_error_is_named_by_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"image": "a.png"},\n  {"image" "b.png"}\n]')
    with pytest.raises(scan_module.DataFileError, match=r"^data file .*data.json is not valid JSON: Expecting ':' "
                                                        r"delimiter at line 3 column 12 \(a .jsonl file"):
        read_rows(path)


def _facts_in_a_process(path: str, cache: str, log: str) -> None:
    """`file_facts` in a forked process, each finding of facts noted in `log` (each process writes its tokenizer
    into a folder of its own: one shared file, rewritten by each, could be read half written)."""
    images = Path(path).parent / "images"
    data = open_dataset(Path(cache).parent / f"process{os.getpid()}", Path(path), image_folder=images)
    rules = RowRules(data.prompter, data.template, TOKENS_PER_IMAGE, 64, images)
    found = scan_module.row_facts

    def noted(*args, **kw):
        with open(log, "a") as f:
            f.write("found\n")
        time.sleep(0.5)  # the others arrive meanwhile
        return found(*args, **kw)
    scan_module.row_facts = noted
    file_facts(Path(path), rules, cache=Path(cache))


def test_processes_checking_one_file_at_once_find_its_facts_once(tmp_path):
    """The ranks of a launcher each plan the run: the first finds the file's facts, the others read them."""
    import multiprocessing

    save_image(tmp_path / "images" / "a.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([INSTRUCT] * 50))
    context = multiprocessing.get_context("fork")
    args = (str(path), str(tmp_path / "cache"), str(tmp_path / "log"))
    processes = [context.Process(target=_facts_in_a_process, args=args) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert (tmp_path / "log").read_text() == "found\n"
