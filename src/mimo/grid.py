"""Per-module grids: a DeviceMesh over each module's span and every process group of every module.

Ranks of a span form a mesh of shape (pp, dp, cp, tp), tp fastest (DESIGN §3). `build_module_grids`
creates every group of every module on every rank in one global order (module order, then
`GROUP_ORDER`), because ranks that create groups in different orders hang or mix up collectives.
Groups with the same ranks are created once and shared (with CP = 1, dp×cp *is* dp): fewer
communicators, and the global order still decides everything.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from mimo.config import LANGUAGE, MimoParallelismConfig, ModuleParallelismConfig

MESH_DIMS = ("pp", "dp", "cp", "tp")
# Every group of a module, in creation order; each maps to the mesh dims it spans.
GROUP_DIMS: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp_cp": ("dp", "cp"),
    "tp_cp": ("tp", "cp"),
    "span": MESH_DIMS,
}
GROUP_ORDER = (*GROUP_DIMS, "pos_embd", "embd")



class Coord(NamedTuple):
    """A rank's place in its module's grid."""

    pp: int
    dp: int
    cp: int
    tp: int


def is_first_pp_stage(stage: int) -> bool:
    """The one definition of a first pipeline stage."""
    return stage == 0


def is_last_pp_stage(stage: int, num_stages: int) -> bool:
    """The one definition of a last pipeline stage."""
    return stage == num_stages - 1


GroupFactory = Callable[[Sequence[int]], "dist.ProcessGroup | None"]


@dataclass
class ProcessGroupCollection:
    """One module's process groups as seen from the current rank; None where the rank is not a member."""

    tp: dist.ProcessGroup | None = None
    cp: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None
    pp: dist.ProcessGroup | None = None
    dp_cp: dist.ProcessGroup | None = None
    tp_cp: dist.ProcessGroup | None = None
    span: dist.ProcessGroup | None = None
    embd: dist.ProcessGroup | None = None
    pos_embd: dist.ProcessGroup | None = None


class ModuleGrid:
    """One module's span as a (pp, dp, cp, tp) grid: rank arithmetic for every rank, handles for members."""

    def __init__(self, name: str, config: ModuleParallelismConfig, rank: int | None = None) -> None:
        if config.data_parallel_size is None:
            raise ValueError(f"module '{name}': finalize the parallelism config before building its grid")
        self.name = name
        self.config = config
        self.rank = dist.get_rank() if rank is None else rank
        self.shape: tuple[int, int, int, int] = config.shape
        self.ranks = torch.arange(config.span.start, config.span.stop).reshape(self.shape)
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.mesh: DeviceMesh | None = None

    # -- arithmetic (valid on every rank) ---------------------------------------------------
    @property
    def span(self) -> range:
        """The global ranks of this module."""
        return self.config.span

    def size(self, dim: str) -> int:
        """The size of mesh dim `dim` ('pp', 'dp', 'cp' or 'tp')."""
        return self.shape[MESH_DIMS.index(dim)]

    def coordinates(self, rank: int | None = None) -> Coord | None:
        """(pp, dp, cp, tp) of `rank` (default: this rank), or None off the span."""
        rank = self.rank if rank is None else rank
        if rank not in self.span:
            return None
        local, coord = rank - self.span.start, []
        for size in reversed(self.shape):  # tp fastest
            local, c = divmod(local, size)
            coord.append(c)
        return Coord(*reversed(coord))

    @property
    def coord(self) -> Coord | None:
        """This rank's (pp, dp, cp, tp), or None if it is not in the module."""
        return self.coordinates()

    def is_first_stage(self, rank: int | None = None) -> bool:
        """True if `rank` (default: this rank) is on the module's first pipeline stage."""
        coord = self.coordinates(rank)
        return coord is not None and is_first_pp_stage(coord.pp)

    def is_last_stage(self, rank: int | None = None) -> bool:
        """True if `rank` (default: this rank) is on the module's last pipeline stage."""
        coord = self.coordinates(rank)
        return coord is not None and is_last_pp_stage(coord.pp, self.size("pp"))

    def is_tp_leader(self, rank: int | None = None) -> bool:
        """True if `rank` (default: this rank) is TP and CP rank 0: who talks for its TP group."""
        coord = self.coordinates(rank)
        return coord is not None and coord.tp == 0 and coord.cp == 0

    def rank_groups(self, dims: str | Sequence[str]) -> list[list[int]]:
        """Every group over mesh dims `dims` (a group name like 'dp_cp' or dim names) as rank lists."""
        dims = GROUP_DIMS[dims] if isinstance(dims, str) else tuple(dims)
        unknown = [d for d in dims if d not in MESH_DIMS]
        if unknown:
            raise ValueError(f"unknown mesh dims {unknown}; dims are {MESH_DIMS}")
        inner = [MESH_DIMS.index(d) for d in MESH_DIMS if d in dims]  # keep mesh order inside a group
        outer = [i for i in range(4) if i not in inner]
        width = math.prod(self.shape[i] for i in inner)
        return self.ranks.permute(*outer, *inner).reshape(-1, width).tolist()

    def group_ranks(self, dims: str | Sequence[str], rank: int | None = None) -> list[int] | None:
        """The ranks of the `dims` group that holds `rank` (default: this rank), or None off the span."""
        rank = self.rank if rank is None else rank
        return next((g for g in self.rank_groups(dims) if rank in g), None)

    def embedding_rank_groups(self) -> list[tuple[list[int], list[int]]]:
        """(pos_embd, embd) rank lists per pipeline group: first stage; first and last stage."""
        return [_embedding_ranks(pp) for pp in self.rank_groups("pp")]

    # -- handles (members only) -------------------------------------------------------------
    def pg_collection(self) -> ProcessGroupCollection:
        """This rank's groups of the module (all None on a rank outside the span)."""
        return ProcessGroupCollection(**{k: self.groups.get(k) for k in GROUP_ORDER})

    def get_group(self, name: str) -> dist.ProcessGroup | None:
        """This rank's group `name` (see GROUP_ORDER), or None if it is not a member."""
        if name not in GROUP_ORDER:
            raise ValueError(f"unknown group '{name}'; groups are {GROUP_ORDER}")
        return self.groups.get(name)

    def __repr__(self) -> str:
        return f"ModuleGrid({self.name!r}, {self.config.describe()}, coord={self.coord})"


def is_pp_first_stage(pp_group: dist.ProcessGroup | None) -> bool:
    """True on the first pipeline stage; a None group means PP = 1, where every rank is first."""
    return pp_group is None or is_first_pp_stage(dist.get_rank(pp_group))


def is_pp_last_stage(pp_group: dist.ProcessGroup | None) -> bool:
    """True on the last pipeline stage; a None group means PP = 1, where every rank is last."""
    return pp_group is None or is_last_pp_stage(dist.get_rank(pp_group), dist.get_world_size(pp_group))


def is_current_rank_in_grid(grid: ModuleGrid) -> bool:
    """True if this process's global rank lies in the grid's span."""
    return dist.get_rank() in grid.span


def populate_embedding_and_position_groups(
    pp_rank_groups: Sequence[Sequence[int]], new_group: GroupFactory | None = None
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Create (pos_embd, embd) for every pipeline group, in order, on every rank; return this rank's pair.

    pos_embd holds a pipeline's first stage; embd its first and last stages (one rank when PP = 1),
    over which tied word-embedding gradients are all-reduced.
    """
    new_group = new_group or _new_group
    rank = dist.get_rank()
    pos_embd = embd = None
    for pp_ranks in pp_rank_groups:
        pos_ranks, embd_ranks = _embedding_ranks(pp_ranks)
        pos = new_group(pos_ranks)
        emb = new_group(embd_ranks)
        if rank in pos_ranks:
            pos_embd = pos
        if rank in embd_ranks:
            embd = emb
    return pos_embd, embd


def build_module_grids(config: MimoParallelismConfig) -> dict[str, ModuleGrid]:
    """Create every group of every module on every rank in the global order; return the grids by module."""
    config.finalize(dist.get_world_size())
    factory = _SharedGroups()
    grids = {name: ModuleGrid(name, m) for name, m in config.module_parallelisms.items()}
    for grid in grids.values():
        for name in GROUP_DIMS:
            for ranks in grid.rank_groups(name):
                pg = factory(ranks)
                if grid.rank in ranks:
                    grid.groups[name] = pg
        if grid.name == LANGUAGE:
            pos, emb = populate_embedding_and_position_groups(grid.rank_groups("pp"), factory)
            grid.groups.update({k: v for k, v in (("pos_embd", pos), ("embd", emb)) if v is not None})
        grid.mesh = _device_mesh(grid)
    return grids


@dataclass
class P2PGroups:
    """Two world-wide groups for point-to-point traffic: activations/embeddings forward, gradients back.

    NCCL runs all sends and receives between two ranks of one group on one communicator and stream, in posting
    order (it ignores tags), so a pipeline or bridge that sends micro-batch m+1 forward before receiving m's
    gradient deadlocks on large messages. One group per direction gives each direction its own stream. Under
    interleaved 1F1B the ring's seam (rank PP-1's chunk c feeding rank 0's chunk c+1, and the gradient back)
    joins the same two ranks as stage 0 → 1 at PP 2, against it: those messages get their own pair of groups
    (`seam_forward`, `seam_backward`, built only for a layout with virtual stages), so every (pair, group)
    carries messages one way only. All span the whole world in rank order, so a global rank is also the
    group rank.
    """

    forward: dist.ProcessGroup
    backward: dist.ProcessGroup
    seam_forward: dist.ProcessGroup | None = None
    seam_backward: dist.ProcessGroup | None = None

    @staticmethod
    def pick(groups: P2PGroups | None, backward: bool, seam: bool = False) -> dist.ProcessGroup | None:
        """The group of one direction (gradients if `backward`; across the interleaved ring's seam if `seam`),
        or None (the default group) without any."""
        if groups is None:
            return None
        if not seam:
            return groups.backward if backward else groups.forward
        if groups.seam_forward is None or groups.seam_backward is None:
            raise RuntimeError("the interleaved pipeline's seam has no p2p groups: build_p2p_groups(seam=True) "
                               "for a layout with virtual_pipeline_model_parallel_size > 1")
        return groups.seam_backward if backward else groups.seam_forward

    @staticmethod
    def isend(groups: P2PGroups | None, tensor: torch.Tensor, peer: int, tag: int, seam: bool = False) -> dist.Work:
        """Post `tensor` to global rank `peer` on its direction's group, told by the tag (even: forward, odd:
        gradients back), as the pipelines tag their messages."""
        group = P2PGroups.pick(groups, backward=tag % 2 == 1, seam=seam)
        return dist.isend(tensor.contiguous(), peer, group=group, tag=tag)

    @staticmethod
    def recv(groups: P2PGroups | None, buffer: torch.Tensor, peer: int, tag: int, seam: bool = False) -> torch.Tensor:
        """Receive into `buffer` from global rank `peer` on the tag's direction's group (blocking); returns it."""
        dist.recv(buffer, peer, group=P2PGroups.pick(groups, backward=tag % 2 == 1, seam=seam), tag=tag)
        return buffer

    @property
    def seam_groups(self) -> tuple[dist.ProcessGroup, ...]:
        """The seam's groups (none without virtual stages)."""
        return tuple(g for g in (self.seam_forward, self.seam_backward) if g is not None)


    def warm_up(self, pairs: Iterable[tuple[int, int]], device: torch.device,
                groups: Sequence[dist.ProcessGroup] | None = None) -> list[tuple[int, int]]:
        """Open, before the first step, every point-to-point channel a step uses: one exchange per pair of
        ranks in each of `groups` (default: each direction's group). Returns the pairs, sorted.

        NCCL creates a pair's communicator at the pair's first send or receive and needs both ranks for it.
        Inside a step, that first gradient send would wait on a peer that may be blocked in a host sync
        (a phase timer, a `.item()`) until messages the sender will only receive later: a deadlock. Every
        rank walks the same sorted list, so no two ranks wait on each other in a cycle.
        """
        ordered = sorted({(min(a, b), max(a, b)) for a, b in pairs if a != b})
        me, token = dist.get_rank(), torch.zeros(1, device=device)
        for low, high in ordered:
            if me not in (low, high):
                continue
            for group in groups or (self.forward, self.backward):
                if me == low:
                    dist.send(token, high, group=group)
                    dist.recv(token, high, group=group)
                else:
                    dist.recv(token, low, group=group)
                    dist.send(token, low, group=group)
        return ordered


def pipeline_pairs(grid: ModuleGrid) -> list[tuple[int, int]]:
    """The (stage s, stage s + 1) rank pairs of every pipeline of `grid`: activations and gradients travel there
    on `P2PGroups`' forward and backward groups (the interleaved ring's seam: `seam_pairs`)."""
    return [pair for ranks in grid.rank_groups("pp") for pair in itertools.pairwise(ranks)]


def seam_pairs(grid: ModuleGrid) -> list[tuple[int, int]]:
    """The (last rank, first rank) pair of every pipeline of `grid` with virtual stages: the interleaved ring's
    seam, whose messages travel on `P2PGroups`' seam groups (none without virtual stages)."""
    if grid.config.virtual_pipeline_model_parallel_size == 1:
        return []
    return [(ranks[-1], ranks[0]) for ranks in grid.rank_groups("pp")]


def build_p2p_groups(seam: bool = False) -> P2PGroups:
    """Create the forward and backward p2p groups, and with `seam` (a layout with virtual pipeline stages) the
    interleaved ring's seam's two (a collective every rank calls, after the module groups)."""
    ranks = list(range(dist.get_world_size()))
    options = group_options(dist.get_backend())
    groups = [dist.new_group(ranks, pg_options=options) for _ in range(4 if seam else 2)]
    return P2PGroups(*groups)


class _SharedGroups:
    """Creates one process group per distinct rank list, in call order, on every rank."""

    def __init__(self) -> None:
        self.by_ranks: dict[tuple[int, ...], dist.ProcessGroup | None] = {}

    def __call__(self, ranks: Sequence[int]) -> dist.ProcessGroup | None:
        key = tuple(ranks)
        if key not in self.by_ranks:
            self.by_ranks[key] = _new_group(key)
        return self.by_ranks[key]


def _new_group(ranks: Sequence[int]) -> dist.ProcessGroup | None:
    """`dist.new_group` (a call every rank makes), None on ranks outside the group."""
    pg = dist.new_group(list(ranks), pg_options=group_options(dist.get_backend()))
    return None if pg in (None, dist.GroupMember.NON_GROUP_MEMBER) else pg


def group_options(backend: str) -> object | None:
    """NCCL: run the group's collectives on a high-priority stream. Gradient reduction overlaps the backward,
    and on a default-priority stream its kernels wait for SMs that compute kernels hold, so a 33 MB bucket
    took 1-4 ms instead of 0.15 and slowed the compute beside it (benchmarks/RESULTS.md, two H200s).
    Other backends: their defaults (None)."""
    if backend != "nccl":
        return None
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    return options


def _embedding_ranks(pp_ranks: Sequence[int]) -> tuple[list[int], list[int]]:
    """(first stage), (first, last stage) of one pipeline group."""
    first, last = pp_ranks[0], pp_ranks[-1]
    return [first], sorted({first, last})


def device_type() -> str:
    """'cuda' when the default backend is NCCL, else 'cpu' (gloo, fake)."""
    return "cuda" if "nccl" in str(dist.get_backend()) else "cpu"


def _device_mesh(grid: ModuleGrid) -> DeviceMesh | None:
    """The (pp, dp, cp, tp) DeviceMesh over the span, built from the groups already created."""
    if grid.coord is None:
        return None
    groups = [grid.groups[d] for d in MESH_DIMS]
    return DeviceMesh.from_group(groups, device_type(), mesh=grid.ranks, mesh_dim_names=MESH_DIMS)
