"""The whole of a LLaVA-format data file checked before launch: JSON syntax, every row's shape, every image's file,
every row's token count against `max_seq_len` with the run's tokenizer and template.

Two steps. `file_facts` reads the file once (a `.json` array's syntax error is the file's, named by line and
column; a JSONL line that does not parse is a bad row) and finds each row's `RowFacts`, what it is whatever the
disk holds: parsed (`conversation.parse_entry`), rendered whole (`template.render_text`, as training tokenizes it),
its text tokens counted, in parallel over the machine's CPUs (forked processes that inherit the parsed rows, each
tokenizing its share in batches). The facts are kept in a cache directory under a key of the file (path, size,
time, sampled bytes), the tokenizer and the template, so the next check of the same file (`mimo train` after
`mimo validate`, a `--resume`) reads them back instead. `RowFacts.judged` then holds them against the disk and the
model: each image looked up in listings of its folder (one `listdir` per folder, not a `stat` per image), each
row's tokens with its images expanded to `tokens_per_image` against `max_seq_len`. What it finds is a `DataScan`:
rows, images, bad rows by reason with a few examples, the length histogram. Images are checked to exist, not
decoded: a corrupt one is still found (and skipped) in training.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import math
import os
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from mimo.data.conversation import ConversationError, parse_entry
from mimo.data.templates import Rendered
from mimo.hf.load import sampled_sha256
from mimo.hf.prompt import Prompter

EXAMPLES = 3  # bad rows shown per reason
PARALLEL_ROWS = 20_000  # fewer rows are scanned in this process (forking costs more than it saves)
BATCH = 2048  # rows tokenized per encode_batch call


class DataFileError(ValueError):
    """A data file that cannot be read as a list of entries."""


@dataclass
class DataScan:
    """What a scan found: `rows` entries referring to `images` image files; `bad` rows by reason (counts) with up to
    `EXAMPLES` of each (`where: detail`); the token count of every row that tokenized (`lengths`, too long ones
    included)."""

    path: str
    max_seq_len: int
    rows: int = 0
    images: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    lengths: array = field(default_factory=lambda: array("i"))

    @property
    def bad_rows(self) -> int:
        """How many rows cannot be trained on (each counted once, under its first fault)."""
        return sum(self.bad.values())

    def add_bad(self, reason: str, where: str, detail: str) -> None:
        """Count one bad row, keeping it as an example while there are fewer than `EXAMPLES` of its reason."""
        self.bad[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(f"{where}: {detail}" if detail else where)

    def bad_reasons(self) -> str:
        """The bad rows in one line: each reason with its count and first example."""
        return "; ".join(f"{reason}: {count} (e.g. {self.examples[reason][0]})"
                         for reason, count in self.bad.most_common())

    def summary(self) -> str:
        """Rows, images, bad rows by reason with examples, and the token-length histogram, as lines of text."""
        lines = [f"{self.path}: {self.rows} rows, {self.images} images, {self.bad_rows} bad rows"]
        for reason, count in self.bad.most_common():
            lines.append(f"  {reason}: {count}")
            lines += [f"    {example}" for example in self.examples[reason]]
        if self.lengths:
            lines.append(f"tokens per row (max_seq_len {self.max_seq_len}): min {min(self.lengths)}, "
                         f"mean {sum(self.lengths) / len(self.lengths):.0f}, max {max(self.lengths)}")
            lines += [f"  {line}" for line in histogram(self.lengths, self.max_seq_len)]
        return "\n".join(lines)


def histogram(lengths: Sequence[int], max_seq_len: int, bins: int = 8, width: int = 40) -> list[str]:
    """`lengths` in `bins` equal ranges up to the larger of their maximum and `max_seq_len`, with bars."""
    top = max(max(lengths), max_seq_len)
    step = max(1, math.ceil(top / bins))
    counts = Counter(min(n // step, bins - 1) for n in lengths)
    most = max(counts.values())
    return [f"{k * step:>7}-{min((k + 1) * step, top):<7} {counts[k]:>8}  {'#' * round(width * counts[k] / most)}"
            for k in range(bins) if k * step <= top]


def check_data_file(path: str | Path) -> None:
    """Before any worker reads it, cheaply (one streamed pass, nothing parsed): the data file is UTF-8 text, and a
    `.json` one holds an array (`[` first); a DataFileError naming what is wrong."""
    path, first, offset = Path(path), "", 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 24)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataFileError(f"data file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} near offset "
                                    f"{offset + e.start}); LLaVA data is UTF-8 JSON") from None
            first = first or text.lstrip()[:1]
            offset += len(chunk)
            if not chunk:
                break
    if path.suffix != ".jsonl" and first != "[":
        raise DataFileError(f"data file {path} must hold a JSON array of entries ([...]); it starts with "
                            f"{first or 'nothing'!r} (a .jsonl file holds one entry a line)")


def read_rows(path: Path) -> tuple[list[Any], array | None]:
    """The entries of a JSON array (`.json`; a syntax error is a DataFileError with its line and column), or of a
    JSONL file (one a line; a line that does not parse becomes a `BadJson` row) with their line numbers."""
    if path.suffix == ".jsonl":
        rows, lines = [], array("q")
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    rows.append(_json_line(line.strip()))
                    lines.append(number)
        return rows, lines
    try:
        rows = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataFileError(f"data file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
                            f"(a .jsonl file holds one entry a line)") from None
    except UnicodeDecodeError as e:
        raise DataFileError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(rows, list):
        raise DataFileError(f"data file {path} must hold a JSON array of entries, got a {type(rows).__name__}")
    return rows, None


@dataclass(frozen=True)
class BadJson:
    """A JSONL line that does not parse: the parser's message with its column."""

    message: str


def _json_line(line: bytes) -> Any:
    """One JSONL line's entry, or a BadJson saying why not."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BadJson(f"{e.msg} at column {e.colno}")
    except UnicodeDecodeError as e:
        return BadJson(f"not UTF-8 ({e.reason} at byte {e.start})")


def leaves_folder(name: str) -> bool:
    """Whether image path `name` points outside the folder it is relative to: absolute, or up past it with `..`
    (judged on the text, so a folder that links to images elsewhere, a symlinked `coco/`, still works)."""
    return os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir


class ImageFolder:
    """Which files an image folder holds, one `listdir` per subfolder asked about (a `stat` per image costs a
    second per 100k on a local disk, and far more on a network file system)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[str, frozenset[str]] = {}

    def has(self, name: str) -> bool:
        """Whether `name` (relative to the folder) is an entry of its folder's listing."""
        folder, base = os.path.split(os.path.normpath(name))
        if folder not in self._listings:
            try:
                self._listings[folder] = frozenset(os.listdir(self.root / folder))
            except OSError:
                self._listings[folder] = frozenset()
        return base in self._listings[folder]


@dataclass(frozen=True)
class RowRules:
    """How a row is checked: the tokenizer and template, an image's token count, the longest row, the folder."""

    prompter: Prompter
    template: Any
    tokens_per_image: int
    max_seq_len: int
    image_folder: Path
    allow_outside: bool = False


OK, BAD_JSON, MALFORMED, LEAVES, IMAGE_TOKENS = range(5)  # what a row is, whatever the disk holds
FAULTS = {BAD_JSON: "not valid JSON", MALFORMED: "malformed conversation",
          LEAVES: "image path leaves data.image_folder", IMAGE_TOKENS: "image tokens do not match the images"}
HEAD = 256  # rows kept as read (the unknown-token check renders them)
SCANS = "data-scans"  # the cache's directory under mimo's (`digits_llava.cache_root`)
KEPT = 16  # files' facts the cache keeps (the newest)


@dataclass
class RowFacts:
    """What each row of a file is, whatever the disk holds (so it can be cached): its `status` (OK or a fault,
    whose detail is in `faults`), its text's tokens (images not expanded) and image count, and the OK rows' image
    files in order (`names`); `head` the first `HEAD` rows as read (None for one that is not JSON)."""

    path: str
    lines: array | None
    status: array = field(default_factory=lambda: array("b"))
    tokens: array = field(default_factory=lambda: array("i"))
    images: array = field(default_factory=lambda: array("i"))
    names: list[str] = field(default_factory=list)
    faults: dict[int, str] = field(default_factory=dict)
    head: list[Any] = field(default_factory=list)

    def where(self, index: int) -> str:
        """Row `index`'s place: `file:line` for JSONL, `file[index]` for a JSON array."""
        return f"{self.path}:{self.lines[index]}" if self.lines is not None else f"{self.path}[{index}]"

    def add(self, status: int, tokens: int = 0, images: Sequence[str] = (), detail: str = "") -> None:
        """One more row's facts."""
        if status != OK:
            self.faults[len(self.status)] = detail
        self.status.append(status)
        self.tokens.append(tokens)
        self.images.append(len(images))
        if status == OK:
            self.names += images

    def extend(self, other: RowFacts) -> None:
        """The next rows' facts (a share's, in file order)."""
        base = len(self.status)
        self.faults.update({base + k: v for k, v in other.faults.items()})
        self.status.extend(other.status)
        self.tokens.extend(other.tokens)
        self.images.extend(other.images)
        self.names += other.names

    def judged(self, rules: RowRules) -> DataScan:
        """The rows judged against the disk and `rules`: an OK row whose image file is missing, or whose tokens
        (each image expanded to `tokens_per_image`) pass `max_seq_len`, is bad too."""
        scan, folder, extra, k = DataScan(self.path, rules.max_seq_len), ImageFolder(rules.image_folder), \
            rules.tokens_per_image - 1, 0
        scan.rows, scan.images = len(self.status), sum(self.images)
        for index, status in enumerate(self.status):
            if status != OK:
                scan.add_bad(FAULTS[status], self.where(index), self.faults[index])
                continue
            names, k = self.names[k:k + self.images[index]], k + self.images[index]
            tokens = self.tokens[index] + len(names) * extra
            scan.lengths.append(tokens)
            missing = next((name for name in names if not folder.has(name)), None)
            if missing is not None:
                scan.add_bad("image file not found", self.where(index), str(rules.image_folder / missing))
            elif tokens > rules.max_seq_len:
                scan.add_bad("too long", self.where(index), f"{tokens} tokens, more than "
                                                            f"max_seq_len={rules.max_seq_len}")
        return scan


_SHARED: tuple[list[Any], RowRules] | None = None  # what forked scanners inherit


def scan_file(path: str | Path, rules: RowRules, workers: int | None = None, cache: Path | None = None) -> DataScan:
    """Every row of the file at `path` checked by `rules` (see the module docstring)."""
    return file_facts(Path(path), rules, workers, cache).judged(rules)


def file_facts(path: Path, rules: RowRules, workers: int | None = None, cache: Path | None = None) -> RowFacts:
    """The facts of every row of the file at `path` (`row_facts`), from `cache` (a directory) when they were found
    there for this file (its path, size, time and sampled bytes), tokenizer and template, else found and stored
    (the newest `KEPT` files' facts are kept). One process at a time finds a file's facts (a lock beside them): the
    ranks of a launcher on one node, each planning its run, wait for the first and read what it stored."""
    stored = cache / f"{facts_key(path, rules)}.pt" if cache is not None else None
    with _locked(stored):
        if stored is not None and stored.is_file():
            try:
                return _load_facts(stored, str(path))
            except (OSError, RuntimeError, KeyError, ValueError):
                pass  # unreadable: found anew
        check_data_file(path)
        rows, lines = read_rows(path)
        facts = row_facts(rows, lines, path, rules, workers)
        if stored is not None:
            _store_facts(facts, stored)
        return facts


@contextmanager
def _locked(stored: Path | None) -> Iterator[None]:
    """An exclusive `flock` on `stored`'s lock file while the block runs (none without a cache, or where the
    cache cannot be written: then each process finds the facts itself)."""
    if stored is None:
        yield
        return
    try:
        stored.parent.mkdir(parents=True, exist_ok=True)
        lock = stored.with_suffix(".lock").open("a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def row_facts(rows: list[Any], lines: array | None, path: Path, rules: RowRules,
              workers: int | None = None) -> RowFacts:
    """The facts of every row of `rows` (`read_rows` of the file at `path`), found over `workers` processes
    (default: the CPUs this process may use)."""
    global _SHARED
    workers = workers or len(os.sched_getaffinity(0))
    shares = _shares(len(rows), workers if len(rows) >= PARALLEL_ROWS else 1)
    _SHARED = (rows, rules)
    try:
        if len(shares) == 1:
            parts = [_share_facts(*shares[0], batched=False)]
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_quiet_tokenizers) as pool:
                parts = list(pool.map(_share_facts, *zip(*shares, strict=True)))
    finally:
        _SHARED = None
    facts = RowFacts(str(path), lines, head=[None if isinstance(r, BadJson) else r for r in rows[:HEAD]])
    for part in parts:
        facts.extend(part)
    return facts


def _shares(rows: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering `rows`: one for one worker, else four per worker (an even finish)."""
    count = 1 if workers == 1 else 4 * workers
    size = max(1, math.ceil(rows / count))
    return [(start, min(start + size, rows)) for start in range(0, rows, size)] or [(0, 0)]


def _quiet_tokenizers() -> None:
    """A forked scanner tokenizes on its own thread: the processes are the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _share_facts(start: int, stop: int, batched: bool = True) -> RowFacts:
    """The facts of rows [start, stop) of the shared rows: shape and images per row, then tokens in batches."""
    rows, rules = _SHARED
    facts = RowFacts("", None)
    pending: list[tuple[int, Rendered]] = []  # (row within the share, rendering) of rows awaiting their tokens
    for index in range(start, stop):
        status, rendered, images, detail = _row(rows[index], rules)
        if status == OK:
            pending.append((len(facts.status), rendered))
        facts.add(status, 0, images, detail)
        if len(pending) == BATCH or (index + 1 == stop and pending):
            _count_tokens(pending, rules, facts, batched)
            pending = []
    return facts


def _row(entry: Any, rules: RowRules) -> tuple[int, Rendered | None, tuple[str, ...], str]:
    """One row's status, rendering, image files and fault detail."""
    if isinstance(entry, BadJson):
        return BAD_JSON, None, (), entry.message
    try:
        conversation = parse_entry(entry)
        rendered = rules.template.render_text(conversation)
    except ConversationError as e:
        return MALFORMED, None, (), str(e)
    images = conversation.images
    outside = next((name for name in images if not rules.allow_outside and leaves_folder(name)), None)
    if outside is not None:
        return LEAVES, None, images, outside
    found = rendered.text.count(rules.prompter.image_token)
    if found != len(images):
        return IMAGE_TOKENS, None, images, f"the rendered text holds {found} image token(s) for {len(images)} image(s)"
    return OK, rendered, images, ""


def _count_tokens(pending: list[tuple[int, Rendered]], rules: RowRules, facts: RowFacts, batched: bool) -> None:
    """Each pending row's text tokens into `facts.tokens`; `batched` tokenizes with one `encode_batch` per kind of
    row (with or without added special tokens), else one row at a time (no thread pool in this process)."""
    tokenizer = rules.prompter.tokenizer
    for flag in {rendered.add_special_tokens for _, rendered in pending}:
        chosen = [(k, rendered.text) for k, rendered in pending if rendered.add_special_tokens == flag]
        texts = [text for _, text in chosen]
        encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
        encodings = encode_batch(texts, add_special_tokens=flag) if batched else \
            [tokenizer.encode(t, add_special_tokens=flag) for t in texts]
        for (k, _), encoding in zip(chosen, encodings, strict=True):
            facts.tokens[k] = len(encoding)


FACTS_VERSION = 1  # bumped when what a row's facts mean changes


def facts_key(path: Path, rules: RowRules) -> str:
    """What a file's facts depend on, hashed: the file (path, size, modification time, sampled bytes), the
    tokenizer, its special tokens and chat template, the template, and whether paths may leave the folder."""
    stat = path.stat()
    prompter = rules.prompter
    parts = [FACTS_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, sampled_sha256(path),
             hashlib.sha256(prompter.tokenizer.to_str().encode()).hexdigest(), prompter.special_tokens,
             prompter.chat_template, prompter.image_token, rules.template.name, rules.allow_outside]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _store_facts(facts: RowFacts, stored: Path) -> None:
    """Write `facts` where `_load_facts` reads them (plain tensors and strings; renamed into place); a cache that
    cannot be written is no error."""
    record = {"status": torch.tensor(facts.status, dtype=torch.int8),
              "tokens": torch.tensor(facts.tokens, dtype=torch.int32),
              "image_counts": torch.tensor(facts.images, dtype=torch.int32),
              "lines": None if facts.lines is None else torch.tensor(facts.lines, dtype=torch.int64),
              "names": "\0".join(facts.names), "faults": [[k, v] for k, v in facts.faults.items()],
              "head": json.dumps(facts.head)}
    try:
        stored.parent.mkdir(parents=True, exist_ok=True)
        partial = stored.with_suffix(f".{os.getpid()}.partial")
        torch.save(record, partial)
        partial.replace(stored)
        for old in sorted(stored.parent.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)[KEPT:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".lock").unlink(missing_ok=True)
    except OSError:
        pass


def _load_facts(stored: Path, path: str) -> RowFacts:
    """The facts `_store_facts` wrote (read with `weights_only`: nothing but tensors and strings)."""
    record = torch.load(stored, weights_only=True)
    lines = None if record["lines"] is None else array("q", record["lines"].tolist())
    return RowFacts(path, lines, array("b", record["status"].tolist()), array("i", record["tokens"].tolist()),
                    array("i", record["image_counts"].tolist()), record["names"].split("\0") if record["names"] else [],
                    {int(k): v for k, v in record["faults"]}, json.loads(record["head"]))
