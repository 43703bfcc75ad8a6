"""docs/config.md, the run config reference, generated from the config dataclasses: every key's name, type (as
written in its annotation), default, bounds (its field's metadata) and the one-line description written next to
the field in the source. Usage: python tools/config_reference.py [--check] (--check: exit 1 if the file is stale)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import sys
import tokenize
import typing
from pathlib import Path

from mimo.config import ModuleParallelismConfig
from mimo.distributed import ModuleDistributedConfig
from mimo.families.registry import DEFAULT_FAMILY, FAMILIES
from mimo.training.run_config import DISTRIBUTED_KEYS, SECTIONS, TrainSection

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "config.md"
ORDER = ("model", "parallelism", "distributed", "train", "data", "checkpoint", "log", "eval")  # a config file's
BOUNDS = (("min", "≥"), ("above", ">"), ("max", "≤"))


@dataclasses.dataclass
class Table:
    """One section's keys: its title, the prefix of its keys, its dataclass and which of its fields are keys."""

    title: str
    prefix: str
    cls: type
    keys: tuple[str, ...]
    inherited: frozenset[str] = frozenset()  # keys whose default is train's key of the same name


def tables() -> list[Table]:
    """Every section of a run config, in a config file's order; the model section once per family."""
    if set(ORDER) != set(SECTIONS):
        raise SystemExit(f"config_reference: the run config's sections are {sorted(SECTIONS)}, the reference's "
                         f"{sorted(ORDER)}: update ORDER")
    result = []
    for name in ORDER:
        if name == "model":
            for family in FAMILIES.values():
                default = " (the default)" if family.name == DEFAULT_FAMILY else ""
                result.append(Table(f"model: family {family.name}{default}", "model", family.section,
                                    _names(family.section)))
        elif name == "parallelism":
            result.append(Table("parallelism.<module>", "parallelism.<module>", ModuleParallelismConfig,
                                _names(ModuleParallelismConfig)))
        elif name == "distributed":
            keys = tuple(k for k in _names(ModuleDistributedConfig) if k in DISTRIBUTED_KEYS)
            result.append(Table("distributed.<module>", "distributed.<module>", ModuleDistributedConfig, keys,
                                frozenset(keys) & frozenset(_names(TrainSection))))
        else:
            cls = SECTIONS[name].default_factory().__class__
            result.append(Table(name, name, cls, _names(cls)))
    return result


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def descriptions(cls: type) -> dict[str, str]:
    """Each field's description: its line's trailing comment, else the comment lines directly above it."""
    tree, trailing, whole = _parsed(sys.modules[cls.__module__].__file__)
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    found = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        own = [trailing[r] for r in range(node.lineno, node.end_lineno + 1) if r in trailing]
        above, row = [], node.lineno - 1
        while row in whole:
            above.insert(0, whole[row])
            row -= 1
        text = " ".join(own or above)
        if text:
            found[node.target.id] = text
    return found


@functools.cache
def _parsed(path: str) -> tuple[ast.Module, dict[int, str], dict[int, str]]:
    """A source file's syntax tree and its comments by line: those after code, and those alone on their line."""
    source = Path(path).read_text(encoding="utf-8")
    lines = source.splitlines()
    trailing, whole = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            (whole if not lines[row - 1][:col].strip() else trailing)[row] = tok.string.lstrip("#").strip()
    return ast.parse(source), trailing, whole


def missing() -> list[str]:
    """The keys that have no description next to their field."""
    return [f"{t.prefix}.{k}" for t in tables() for k in t.keys if k not in descriptions(t.cls)]


def render() -> str:
    """The whole of docs/config.md."""
    out = ["# Run config reference", "",
           "Generated from the config dataclasses by `python tools/config_reference.py` (do not edit by hand; "
           "`tests/test_config_reference.py` fails when this page is stale). A run config is YAML with these "
           "sections; `mimo train CONFIG --set section.key=value` overrides any key, and an unknown key or a value "
           "of the wrong type or out of range is an error naming the key. `null` is YAML's None.", ""]
    for table in tables():
        out += _table(table)
    return "\n".join(out)


def _table(table: Table) -> list[str]:
    """One section's heading, its dataclass's summary and a row per key."""
    doc = inspect.getdoc(table.cls) or ""
    summary = " ".join(doc.split("\n\n")[0].split())
    said = descriptions(table.cls)
    fields = {f.name: f for f in dataclasses.fields(table.cls)}
    rows = [f"## `{table.title}`", "", f"{summary} (`{table.cls.__module__}.{table.cls.__name__}`)", "",
            "| key | type | default | range | description |", "|---|---|---|---|---|"]
    for key in table.keys:
        f = fields[key]
        default = f"`train.{key}`" if key in table.inherited else _code(_default(f))
        bounds = ", ".join(f"{sign} {f.metadata[k]}" for k, sign in BOUNDS if k in f.metadata)
        rows.append(f"| `{key}` | {_code(_type(table.cls, f))} | {default} | {bounds} | "
                    f"{_cell(said.get(key, ''))} |")
    return rows + [""]


def _type(cls: type, f: dataclasses.Field) -> str:
    """The annotation as written, a module's Literal alias (`DataParallel`) spelled out."""
    written = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    names = vars(sys.modules[cls.__module__])

    def spelled(match: re.Match) -> str:
        alias = names.get(match.group(0))
        if typing.get_origin(alias) is typing.Literal:
            return f"Literal[{', '.join(map(repr, typing.get_args(alias)))}]"
        return match.group(0)

    return re.sub(r"\b[A-Z]\w*\b", spelled, written)


def _default(f: dataclasses.Field) -> str:
    """The field's default in YAML's spelling (its default_factory called); `required` if it has none."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return json.dumps(value)


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def main(argv: list[str]) -> int:
    """Write docs/config.md, or with --check say whether it is what the dataclasses give now."""
    if argv not in ([], ["--check"]):
        print("usage: python tools/config_reference.py [--check]", file=sys.stderr)
        return 2
    if missing():
        print(f"config_reference: no description next to {', '.join(missing())} (a `# comment` on or above the "
              f"field's line)", file=sys.stderr)
        return 1
    text = render()
    if not argv:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT}")
        return 0
    old = OUTPUT.read_text() if OUTPUT.is_file() else ""
    if old == text:
        return 0
    old_lines, new_lines = old.splitlines(), text.splitlines()
    n = next((i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=False)) if a != b),
             min(len(old_lines), len(new_lines)))
    was = old_lines[n] if n < len(old_lines) else "(end of file)"
    now = new_lines[n] if n < len(new_lines) else "(end of file)"
    print(f"{OUTPUT} is stale at line {n + 1}: it has {was!r}, the dataclasses give {now!r}; run python "
          f"tools/config_reference.py", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
