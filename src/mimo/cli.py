"""The `mimo` command line: `mimo layout CONFIG.yaml [--world-size N]` (training arrives with `mimo train`)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mimo.config import LANGUAGE, LayoutError, MimoParallelismConfig
from mimo.grid import MESH_DIMS, ModuleGrid

LAYOUT_KEYS = ("parallelism", "world_size")


class ConfigFileError(ValueError):
    """A config file that cannot be read or does not have the expected shape."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (no object construction); errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_layout(path: str | Path, world_size: int | None = None) -> MimoParallelismConfig:
    """Read and finalize a layout file (`parallelism:` plus optional `world_size:`)."""
    data = read_yaml(path)
    unknown = sorted(set(data) - set(LAYOUT_KEYS))
    if unknown:
        raise ConfigFileError(f"{path}: unknown top-level key(s) {unknown}; allowed keys are {list(LAYOUT_KEYS)}")
    if "parallelism" not in data:
        raise ConfigFileError(f"{path}: missing 'parallelism' (a mapping of module name -> layout fields)")
    config = MimoParallelismConfig.from_dict(data["parallelism"])
    world_size = world_size or data.get("world_size") or _implied_world_size(config, path)
    return config.finalize(world_size)


def _implied_world_size(config: MimoParallelismConfig, path: str | Path) -> int:
    """The end of the last span, when every module's DP size is given."""
    missing = [n for n, m in config.module_parallelisms.items() if m.data_parallel_size is None]
    if missing:
        raise ConfigFileError(
            f"{path}: modules {missing} leave data_parallel_size to be derived, so the world size must be "
            f"given: pass --world-size N or set world_size in the file"
        )
    return config.total_world_size


def render_rank_map(config: MimoParallelismConfig) -> str:
    """The layout as text: modules, deployment, edges, stub ranks, and every rank's coordinates."""
    world = config.world_size
    grids = {n: ModuleGrid(n, m, rank=-1) for n, m in config.module_parallelisms.items()}
    width = max(len(n) for n in [*grids, "stub"])
    lines = [f"world size {world}, deployment {config.deployment}", "modules:"]
    lines += [f"  {n:<{width}}  {m.describe()}" for n, m in config.module_parallelisms.items()]
    edges = ", ".join(f"{s} -> {d}" for s, d in config.edges) or "none"
    stubs = config.stub_ranks(world)
    lines += [f"edges: {edges}", f"stub ranks: {', '.join(map(str, stubs)) or 'none'}", ""]
    lines.append(f"rank  {'module':<{width}}  " + "  ".join(f"{d:>2}" for d in MESH_DIMS) + "  roles")
    for rank in range(world):
        hosted = config.modules_on_rank(rank)
        if not hosted:
            lines.append(f"{rank:>4}  {'stub':<{width}}  " + "  ".join(" -" for _ in MESH_DIMS))
        for name in hosted:
            coord = grids[name].coordinates(rank)
            roles = _roles(grids[name], rank)
            lines.append(f"{rank:>4}  {name:<{width}}  " + "  ".join(f"{c:>2}" for c in coord) + f"  {roles}".rstrip())
    return "\n".join(lines)


def _roles(grid: ModuleGrid, rank: int) -> str:
    """Pipeline and bridge roles: first/last stage, embedding group, leader of its TP group (TP rank 0)."""
    pp, _, cp, tp = grid.coordinates(rank)
    n_pp = grid.size("pp")
    roles = []
    if n_pp > 1:
        roles.append("first stage" if pp == 0 else "last stage" if pp == n_pp - 1 else "middle stage")
    if grid.name == LANGUAGE and n_pp > 1 and pp in (0, n_pp - 1):
        roles.append("embd")
    if tp == 0 and cp == 0 and grid.size("tp") > 1:
        roles.append("leader")
    return ", ".join(roles)


def cmd_layout(args: argparse.Namespace) -> int:
    """Validate a layout file and print its rank map."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_layout(args.config, args.world_size)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"layout {args.config}")
    print(render_rank_map(config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="mimo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    layout = sub.add_parser("layout", help="validate a parallel layout and print its rank map")
    layout.add_argument("config", help="a YAML file with a 'parallelism' section")
    layout.add_argument("--world-size", type=_positive_int, default=None,
                        help="number of ranks (default: the file's world_size, or the end of the last span)")
    layout.set_defaults(run=cmd_layout)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; a bad file or layout is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (LayoutError, ConfigFileError) as e:  # the user's input, not a bug: no traceback
        print(f"mimo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
