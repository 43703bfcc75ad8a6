"""The shape of `src/mimo`: imports point one way (no cycle, lazy imports inside functions counted too), and
nothing outside a family's folder names a family's classes or modality keys."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FAMILIES = SRC / "mimo" / "families"
# "images" that is not a modality key: LLaVA-format files' JSON key, and the digits' image folder on disk
NOT_A_MODALITY = {"mimo/data/conversation.py", "mimo/data/digits_llava.py"}


def module_name(path: Path) -> str:
    """`mimo.a.b` for src/mimo/a/b.py (a package's `__init__.py` is the package)."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The mimo modules `path` imports anywhere (functions too; `if TYPE_CHECKING:` blocks aside), each import
    also importing the packages above it."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    out = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        parts = target.split(".")
        out.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return {t for t in out if t in known and t != name and not name.startswith(t + ".")}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (a path that comes back to its start), or []."""
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := walk(start)):
            return found
    return []


def test_no_import_cycle_in_src():
    known = modules()
    graph = {name: imported(path, name, set(known)) for name, path in known.items()}
    assert "mimo.training.plan" in graph["mimo.cli"], "the import graph misses lazy imports"
    assert cycle(graph) == [], " -> ".join(cycle(graph))


def test_families_and_models_import_no_training_code():
    """The layers below training (families, models, hf, data) never import it, lazily or not."""
    known = modules()
    below = [n for n in known if n.startswith(("mimo.families", "mimo.models", "mimo.hf", "mimo.data"))]
    upward = {n: sorted(t for t in imported(known[n], n, set(known)) if t.startswith("mimo.training")) for n in below}
    assert {n: t for n, t in upward.items() if t} == {}


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []


def test_no_family_name_outside_its_folder():
    """The literal modality key "images" and `LlavaMimoProvider` appear only inside src/mimo/families/."""
    found = []
    for path in SRC.rglob("*.py"):
        where = str(path.relative_to(SRC))
        if path.is_relative_to(FAMILIES) or where in NOT_A_MODALITY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("images", "images.") or ".images." in str(
                    getattr(node, "value", "")):
                found.append(f"{where}:{node.lineno} 'images'")
            if isinstance(node, ast.Name | ast.alias) and "LlavaMimoProvider" in ast.unparse(node):
                found.append(f"{where}:{node.lineno} LlavaMimoProvider")
    assert found == []
