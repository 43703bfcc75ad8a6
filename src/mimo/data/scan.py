"""The whole of a LLaVA-format data file checked before launch: JSON syntax, every row's shape, every image's file,
every row's token count against `max_seq_len` with the run's tokenizer and template.

`scan_file` reads the file once (a `.json` array's syntax error is the file's, named by line and column; a JSONL
line that does not parse is a bad row), then, in parallel over the machine's CPUs (forked processes that inherit
the parsed rows, each tokenizing its share in batches), parses each row (`conversation.parse_entry`), renders it
(`template.render_text`: the whole text, as training tokenizes it), counts its tokens with each image expanded to
`tokens_per_image`, and looks its images up in listings of their folders (one `listdir` per folder, not a `stat`
per image). What it finds is a `DataScan`: rows, images, bad rows by reason with a few examples, the length
histogram. Images are checked to exist, not decoded: a corrupt one is still found (and skipped) in training.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from mimo.data.conversation import ConversationError, parse_entry
from mimo.data.templates import Rendered
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

    def merge(self, other: DataScan) -> None:
        """Add another share's findings (shares merged in file order keep the first examples)."""
        self.rows += other.rows
        self.images += other.images
        self.lengths.extend(other.lengths)
        for reason, count in other.bad.items():
            self.bad[reason] += count
            shown = self.examples.setdefault(reason, [])
            shown += other.examples[reason][:EXAMPLES - len(shown)]

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


_SHARED: tuple[list[Any], array | None, RowRules, str] | None = None  # what forked scanners inherit


def scan_file(path: str | Path, rules: RowRules, workers: int | None = None) -> DataScan:
    """Every row of the file at `path` checked by `rules` (see the module docstring)."""
    return scan_rows(*read_rows(Path(path)), Path(path), rules, workers)


def scan_rows(rows: list[Any], lines: array | None, path: Path, rules: RowRules,
              workers: int | None = None) -> DataScan:
    """Every row of `rows` (`read_rows` of the file at `path`) checked by `rules`, over `workers` processes
    (default: the CPUs this process may use, shared by the ranks of a launcher on this node)."""
    global _SHARED
    workers = workers or max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    shares = _shares(len(rows), workers if len(rows) >= PARALLEL_ROWS else 1)
    _SHARED = (rows, lines, rules, str(path))
    try:
        if len(shares) == 1:
            parts = [_scan_share(*shares[0], batched=False)]
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_quiet_tokenizers) as pool:
                parts = list(pool.map(_scan_share, *zip(*shares, strict=True)))
    finally:
        _SHARED = None
    scan = DataScan(str(path), rules.max_seq_len)
    for part in parts:
        scan.merge(part)
    return scan


def _shares(rows: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering `rows`: one for one worker, else four per worker (an even finish)."""
    count = 1 if workers == 1 else 4 * workers
    size = max(1, math.ceil(rows / count))
    return [(start, min(start + size, rows)) for start in range(0, rows, size)] or [(0, 0)]


def _quiet_tokenizers() -> None:
    """A forked scanner tokenizes on its own thread: the processes are the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _scan_share(start: int, stop: int, batched: bool = True) -> DataScan:
    """Rows [start, stop) of the shared file checked: shape and images per row, then tokens in batches."""
    rows, lines, rules, path = _SHARED
    scan = DataScan(path, rules.max_seq_len)
    folder = ImageFolder(rules.image_folder)
    pending: list[tuple[str, Rendered, int]] = []  # (where, rendering, images) of rows awaiting their token count
    for index in range(start, stop):
        where = f"{path}:{lines[index]}" if lines is not None else f"{path}[{index}]"
        scan.rows += 1
        rendered, images = _check_row(rows[index], where, rules, folder, scan)
        if rendered is not None:
            pending.append((where, rendered, images))
        if len(pending) == BATCH or (index + 1 == stop and pending):
            _count_tokens(pending, rules, scan, batched)
            pending = []
    return scan


def _check_row(entry: Any, where: str, rules: RowRules, folder: ImageFolder,
               scan: DataScan) -> tuple[Rendered | None, int]:
    """One row's shape and images (a fault counted in `scan`), and its rendering and image count (None if bad)."""
    if isinstance(entry, BadJson):
        scan.add_bad("not valid JSON", where, entry.message)
        return None, 0
    try:
        conversation = parse_entry(entry)
        rendered = rules.template.render_text(conversation)
    except ConversationError as e:
        scan.add_bad("malformed conversation", where, str(e))
        return None, 0
    scan.images += len(conversation.images)
    for name in conversation.images:
        if not rules.allow_outside and leaves_folder(name):
            scan.add_bad("image path leaves data.image_folder", where, name)
            return None, 0
        if not folder.has(name):
            scan.add_bad("image file not found", where, str(rules.image_folder / name))
            return None, 0
    found = rendered.text.count(rules.prompter.image_token)
    if found != len(conversation.images):
        scan.add_bad("image tokens do not match the images", where,
                     f"the rendered text holds {found} image token(s) for {len(conversation.images)} image(s)")
        return None, 0
    return rendered, len(conversation.images)


def _count_tokens(pending: list[tuple[str, Rendered, int]], rules: RowRules, scan: DataScan, batched: bool) -> None:
    """Each pending row's tokens (its images expanded), recorded in `scan.lengths`; a row over max_seq_len is bad.
    `batched` tokenizes with one `encode_batch` per kind of row (with or without added special tokens)."""
    tokenizer, extra = rules.prompter.tokenizer, rules.tokens_per_image - 1
    special = [rendered.add_special_tokens for _, rendered, _ in pending]
    counts = [0] * len(pending)
    for flag in set(special):
        chosen = [k for k, s in enumerate(special) if s == flag]
        texts = [pending[k][1].text for k in chosen]
        encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
        encodings = encode_batch(texts, add_special_tokens=flag) if batched else \
            [tokenizer.encode(t, add_special_tokens=flag) for t in texts]
        for k, encoding in zip(chosen, encodings, strict=True):
            counts[k] = len(encoding)
    for (where, _, images), count in zip(pending, counts, strict=True):
        tokens = count + images * extra
        scan.lengths.append(tokens)
        if tokens > rules.max_seq_len:
            scan.add_bad("too long", where, f"{tokens} tokens, more than max_seq_len={rules.max_seq_len}")
