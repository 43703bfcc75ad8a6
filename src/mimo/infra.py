"""What a rank knows about the deployment (`MimoModelInfra`): the grids, its groups, the modules it hosts.

Its own module, below the provider, so that the code that consumes it (`distributed`, the training step,
the optimizers) can name its type without an upward import. Only what cannot be derived is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimo.config import LANGUAGE, Deployment, MimoParallelismConfig
from mimo.grid import ModuleGrid, P2PGroups, ProcessGroupCollection


@dataclass
class MimoModelInfra:
    """A rank's view of the deployment: every module's grid, the modules it hosts, the finalized layout
    (None on one process, where this rank hosts everything) and the point-to-point groups."""

    module_to_grid_map: dict[str, ModuleGrid]
    participating_modules: list[str]
    config: MimoParallelismConfig | None
    p2p_groups: P2PGroups | None = None  # forward / backward point-to-point groups (None on one process)

    @property
    def pg_collections(self) -> dict[str, ProcessGroupCollection]:
        """This rank's process groups of every module (all None where it is not a member)."""
        return {name: grid.pg_collection() for name, grid in self.module_to_grid_map.items()}

    @property
    def deployment(self) -> Deployment:
        """The layout's deployment kind; one process is homogeneous."""
        return "homogeneous" if self.config is None else self.config.deployment

    @property
    def is_stub_rank(self) -> bool:
        """True on a rank in no module's span."""
        return not self.participating_modules

    @property
    def topology(self) -> dict[str, list[str]]:
        """Each module's destinations: the layout's edges (one process: every modality -> language)."""
        if self.config is None:
            return {m: [LANGUAGE] for m in self.participating_modules if m != LANGUAGE}
        out: dict[str, list[str]] = {}
        for src, dst in self.config.edges:
            out.setdefault(src, []).append(dst)
        return out
