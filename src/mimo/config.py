"""Per-module parallel layouts and their validation (DESIGN §2–3).

A module's layout is TP × CP × DP × PP (plus EP) on a contiguous span of ranks. `finalize` derives what
can be derived and rejects, with a message naming the module(s), the ranks and what would be valid,
everything that cannot train to the single-process answer.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mimo.training.schedules import check_interleaving

LANGUAGE = "language"
MAX_WORLD_SIZE = 1 << 17  # 131072 ranks: beyond the largest jobs run today; a typo past it must not eat the memory
Deployment = Literal["homogeneous", "colocated", "heterogeneous"]
_SIZE_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
)


class LayoutError(ValueError):
    """A parallel layout that mimo cannot run, with the reason and what would be valid."""


class RunConfigError(ValueError):
    """A training config that cannot run, naming the key and what would be valid."""


class ConfigFileError(ValueError):
    """A config file that cannot be read or does not have the expected shape."""


MAX_YAML_NODES = 10_000  # a config expands to a few hundred nodes; an alias bomb to billions (issue 27)
SHOWN_CHARS = 80  # a value quoted in an error message is cut to this many characters


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters (a value can be megabytes of YAML)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _Loader(yaml.SafeLoader):
    """YAML's safe loader (no object construction), stricter where YAML 1.1 surprises users: an exponent-form number
    (`3e-3`, `4.0e3`: strings in YAML 1.1, floats in 1.2 and to users) is a float; a key given twice in one mapping
    is an error naming both lines; aliases are followed, but a document that expands past `MAX_YAML_NODES` nodes
    (an alias bomb: 1.6 KB expands to gigabytes) is refused before anything is built."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(f"the document expands to more than {MAX_YAML_NODES} values through its aliases "
                                 f"(*name); a config needs a few hundred: write the values out")
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """How many nodes `node` stands for with every alias expanded (linear in the composed graph: shared nodes
    are counted once per use, computed once); a node that contains itself counts as unbounded."""
    key = id(node)
    if key in sizes:
        size = sizes[key]
        return MAX_YAML_NODES + 1 if size is None else size  # None: still being counted, a cycle
    sizes[key] = None
    size = 1
    children = node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else []
    for child in children:
        for part in child if isinstance(child, tuple) else (child,):
            size += _expanded_size(part, sizes)
            if size > MAX_YAML_NODES:
                break
        if size > MAX_YAML_NODES:
            break
    sizes[key] = size
    return size


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """A YAML error naming a key written twice in one mapping and both its lines (YAML 1.1 keeps the last silently:
    a second `train:` section replaced the first). Keys merged in by `<<:` may be overridden, as YAML allows."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in seen:
            where = f"on lines {seen[key]} and {line}" if seen[key] != line else f"on line {line}"
            raise yaml.constructor.ConstructorError(
                None, None, f"key {shown(key)} appears twice in one mapping, {where}; keep one")
        seen[key] = line


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load_yaml_text(text: str) -> Any:
    """Parse YAML text with `_Loader`: safely, exponent-form numbers as floats, no duplicate keys, bounded aliases."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (no object construction); errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{path}: not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset {e.start}); "
                              f"a config is YAML text") from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:  # the parser recurses per level: a few thousand nested brackets
        raise ConfigFileError(f"{path}: nested too deeply to be a config (thousands of levels)") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@dataclass
class ModuleParallelismConfig:
    """One module's layout and where its span starts; DP may be left None where it can be derived.

    `sequence_parallel` (Megatron's name) keeps a TP module's activations sharded along the sequence over its
    TP group between and around its blocks' attention and MLP: norms and residual adds run on 1/TP of the
    tokens, each all-reduce becomes an all-gather before and a reduce-scatter after (same traffic, 1/TP of the
    activation memory outside the matmuls). It needs tensor_model_parallel_size > 1. Any sequence length works
    (DTensor's uneven sharding: 577 ViT tokens over TP 2 are 289 + 288), and results change only by rounding (a
    norm weight's gradient is summed per TP rank's tokens, then over TP). Plans: `models/sequence_parallel.py`.

    `tp_comm_overlap` (Megatron's name; torch's asynchronous TP) splits each of those all-gathers + matmul and
    matmul + reduce-scatter into chunks whose communication overlaps the matmuls: an inductor pass over the
    compiled blocks, with symmetric memory over the TP group. It needs sequence_parallel (its collectives are
    the ones fused), compile and CUDA GPUs: rules of the distributed settings (`distributed.check_tp_comm_overlap`).
    """

    tensor_model_parallel_size: int = 1  # TP: ranks each of the module's layers is split over
    pipeline_model_parallel_size: int = 1  # PP: stages the module's layers are split into (an encoder: own ranks)
    # VPP (Megatron's name): model chunks per pipeline rank, run in the interleaved 1F1B order (needs PP > 1)
    virtual_pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1  # CP: splits the language model's sequences (an encoder's: homogeneous only)
    expert_model_parallel_size: int = 1  # EP: not supported yet (1)
    # DP: the module's replicas; None: derived from the world size (a module spanning the world from rank 0)
    data_parallel_size: int | None = None
    rank_offset: int = 0  # the first rank of the module's span
    # keep a TP module's activations sharded along the sequence between its blocks (needs TP > 1)
    sequence_parallel: bool = False
    # overlap sequence parallelism's all-gathers and reduce-scatters with the matmuls (needs compile, CUDA)
    tp_comm_overlap: bool = False

    @property
    def total_model_parallel_size(self) -> int:
        """Ranks of one model replica: TP · CP · PP."""
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size

    @property
    def total_ranks(self) -> int:
        """Ranks of the whole span: TP · CP · PP · DP (DP must be known)."""
        if self.data_parallel_size is None:
            raise LayoutError("total_ranks is unknown until data_parallel_size is set or derived by finalize()")
        return self.total_model_parallel_size * self.data_parallel_size

    @property
    def span(self) -> range:
        """The ranks this module lives on."""
        return range(self.rank_offset, self.rank_offset + self.total_ranks)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The (pp, dp, cp, tp) mesh shape of the span."""
        return (self.pipeline_model_parallel_size, self.data_parallel_size or 0,
                self.context_parallel_size, self.tensor_model_parallel_size)

    def finalize(self, world_size: int, name: str = "module") -> ModuleParallelismConfig:
        """Check sizes and derive DP when the module spans the whole world; returns self."""
        self._check_sizes(name)
        if self.data_parallel_size is None:
            self.data_parallel_size = self._derived_dp(world_size, name)
        return self

    def _check_sizes(self, name: str) -> None:
        for f in (*_SIZE_FIELDS, "virtual_pipeline_model_parallel_size", "data_parallel_size"):
            v = getattr(self, f)
            if v is None and f == "data_parallel_size":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LayoutError(f"module '{name}': {f} must be a positive integer, got {shown(v)}")
        if not isinstance(self.rank_offset, int) or isinstance(self.rank_offset, bool) or self.rank_offset < 0:
            raise LayoutError(f"module '{name}': rank_offset must be an integer >= 0, got {shown(self.rank_offset)}")
        if not isinstance(self.sequence_parallel, bool):
            raise LayoutError(f"module '{name}': sequence_parallel must be true or false, "
                              f"got {shown(self.sequence_parallel)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise LayoutError(f"module '{name}': sequence_parallel shards the sequence over the tensor-parallel "
                              f"group, but tensor_model_parallel_size is 1; set sequence_parallel false or "
                              f"tensor_model_parallel_size > 1")
        if not isinstance(self.tp_comm_overlap, bool):
            raise LayoutError(f"module '{name}': tp_comm_overlap must be true or false, "
                              f"got {shown(self.tp_comm_overlap)}")
        if self.virtual_pipeline_model_parallel_size > 1 and self.pipeline_model_parallel_size == 1:
            raise LayoutError(f"module '{name}': virtual_pipeline_model_parallel_size="
                              f"{self.virtual_pipeline_model_parallel_size} splits each pipeline rank's layers into "
                              f"model chunks, but pipeline_model_parallel_size is 1; set "
                              f"pipeline_model_parallel_size > 1 or virtual_pipeline_model_parallel_size 1")

    def _derived_dp(self, world_size: int, name: str) -> int:
        mp = self.total_model_parallel_size
        if self.rank_offset != 0:
            raise LayoutError(
                f"module '{name}': data_parallel_size is None but the module starts at rank {self.rank_offset}; "
                f"DP can be derived only for a module that spans the whole world (rank_offset 0) — "
                f"set data_parallel_size explicitly"
            )
        if world_size % mp:
            raise LayoutError(
                f"module '{name}': cannot derive data_parallel_size: world_size {world_size} is not divisible "
                f"by TP·CP·PP = {mp}; use a world size that is a multiple of {mp} or set data_parallel_size"
            )
        return world_size // mp

    def describe(self) -> str:
        """A short layout string, e.g. 'TP2 x PP2 x DP1 on ranks 2-5' ('TP2+SP' with sequence parallelism)."""
        parts = [f"TP{self.tensor_model_parallel_size}" + ("+SP" if self.sequence_parallel else "")
                 + ("+overlap" if self.tp_comm_overlap else "")]
        if self.context_parallel_size > 1:
            parts.append(f"CP{self.context_parallel_size}")
        if self.pipeline_model_parallel_size > 1:
            parts.append(f"PP{self.pipeline_model_parallel_size}" + (
                f"+VPP{self.virtual_pipeline_model_parallel_size}" if self.virtual_pipeline_model_parallel_size > 1
                else ""))
        parts.append(f"DP{self.data_parallel_size}")
        return " x ".join(parts) + f" on {_ranks(self.span)}"

    def same_layout(self, other: ModuleParallelismConfig) -> bool:
        """True if both have the same sizes in every dimension (offsets aside)."""
        keys = (*_SIZE_FIELDS, "data_parallel_size")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclass
class MimoParallelismConfig:
    """The layouts of all modules of a MIMO model; `finalize(world_size)` validates them together."""

    module_parallelisms: dict[str, ModuleParallelismConfig]
    topology: dict[str, list[str]] | None = None
    _world_size: int | None = field(default=None, init=False, repr=False, compare=False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MimoParallelismConfig:
        """Build from {module: {field: value}}; an unknown field names itself and the allowed ones."""
        if not isinstance(data, Mapping) or not data:
            raise LayoutError(f"parallelism must be a mapping of module name -> layout fields, got {shown(data)}")
        allowed = [f.name for f in dataclasses.fields(ModuleParallelismConfig)]
        modules = {}
        for name, fields_ in data.items():
            if not isinstance(name, str) or not name:
                raise LayoutError(f"module names must be non-empty strings, got {shown(name)}")
            fields_ = fields_ or {}
            if not isinstance(fields_, Mapping):
                raise LayoutError(f"module '{name}': expected a mapping of layout fields, got {shown(fields_)}")
            unknown = sorted(set(fields_) - set(allowed))
            if unknown:
                raise LayoutError(
                    f"module '{name}': unknown key(s) {shown(unknown, 200)}; allowed keys are {allowed}"
                )
            modules[name] = ModuleParallelismConfig(**fields_)
            modules[name]._check_sizes(name)  # a size given as "2" or "two" is named here, not a TypeError later
        return cls(modules)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The plain-dict (YAML) form, the inverse of `from_dict`."""
        return {name: dataclasses.asdict(m) for name, m in self.module_parallelisms.items()}

    # -- queries ------------------------------------------------------------------------------
    @property
    def module_names(self) -> list[str]:
        """Module names in the global order used everywhere (the order they were declared)."""
        return list(self.module_parallelisms)

    @property
    def modality_names(self) -> list[str]:
        """Every module but the language model."""
        return [n for n in self.module_parallelisms if n != LANGUAGE]

    def get_parallelism(self, name: str) -> ModuleParallelismConfig:
        """The layout of module `name`; a KeyError names the modules that exist."""
        try:
            return self.module_parallelisms[name]
        except KeyError:
            raise KeyError(f"no module '{name}'; modules are {self.module_names}") from None

    @property
    def edges(self) -> list[tuple[str, str]]:
        """Data dependencies (src, dst): the topology, by default every modality -> language."""
        topo = self.topology or {m: [LANGUAGE] for m in self.modality_names}
        return [(src, dst) for src, dsts in topo.items() for dst in dsts]

    @property
    def total_world_size(self) -> int:
        """The smallest world that holds every span: the end of the last span (every DP size must be known)."""
        missing = [n for n, m in self.module_parallelisms.items() if m.data_parallel_size is None]
        if missing:
            raise LayoutError(f"modules {missing} leave data_parallel_size to be derived, so the layout does not "
                              f"say its world size: set their data_parallel_size, or give the world size")
        return max(m.rank_offset + m.total_ranks for m in self.module_parallelisms.values())

    def stub_ranks(self, world_size: int | None = None) -> list[int]:
        """Ranks in no module's span (only leading ranks can be; anything else fails validation)."""
        world_size = world_size if world_size is not None else self.total_world_size
        used = set()
        for m in self.module_parallelisms.values():
            used.update(m.span)
        return [r for r in range(world_size) if r not in used]

    def modules_on_rank(self, rank: int) -> list[str]:
        """The modules whose span holds `rank`, in module order."""
        return [n for n, m in self.module_parallelisms.items() if rank in m.span]

    @property
    def deployment(self) -> Deployment:
        """homogeneous (same span, same layout, no encoder pipelined), colocated (same span) or heterogeneous (spans
        differ)."""
        mods = list(self.module_parallelisms.values())
        if any(m.span != mods[0].span for m in mods):
            return "heterogeneous"
        pipelined = any(self.module_parallelisms[n].pipeline_model_parallel_size > 1 for n in self.modality_names)
        if all(m.same_layout(mods[0]) for m in mods) and not pipelined:  # as `bridge.bridge_kind` decides per edge
            return "homogeneous"
        return "colocated"

    # -- validation ---------------------------------------------------------------------------
    def finalize(self, world_size: int) -> MimoParallelismConfig:
        """Derive DP where possible and apply every rule of DESIGN §3 "Validation"; returns self.

        Finalizing again for the same world size is a no-op (no second round of warnings).
        """
        if self._world_size == world_size:
            return self
        if not isinstance(world_size, int) or isinstance(world_size, bool) or not 1 <= world_size <= MAX_WORLD_SIZE:
            raise LayoutError(f"world_size must be an integer from 1 to {MAX_WORLD_SIZE}, got {shown(world_size)}")
        if LANGUAGE not in self.module_parallelisms:
            raise LayoutError(
                f"no '{LANGUAGE}' module: every MIMO model has one; modules given: {self.module_names}"
            )
        for name, m in self.module_parallelisms.items():
            m.finalize(world_size, name)
            self._check_supported(name, m)
        self._check_topology()
        self._check_spans(world_size)
        self._check_encoder_context()
        self._check_edges()
        self._world_size = world_size
        return self

    @property
    def world_size(self) -> int:
        """The world size given to `finalize`."""
        if self._world_size is None:
            raise LayoutError("the parallelism config is not finalized: call finalize(world_size) first")
        return self._world_size

    @staticmethod
    def _check_supported(name: str, m: ModuleParallelismConfig) -> None:
        if m.expert_model_parallel_size > 1:
            raise LayoutError(
                f"module '{name}': expert_model_parallel_size={m.expert_model_parallel_size} is not supported "
                f"yet; use 1"
            )
        if name != LANGUAGE and m.pipeline_model_parallel_size > 1 and m.context_parallel_size > 1:
            raise LayoutError(
                f"module '{name}': context_parallel_size={m.context_parallel_size} with "
                f"pipeline_model_parallel_size={m.pipeline_model_parallel_size} is not supported for a modality "
                f"module (an encoder's CP splits items only inside the language model's own layout); use 1 for one"
            )
        if name != LANGUAGE and m.virtual_pipeline_model_parallel_size > 1:
            raise LayoutError(
                f"module '{name}': virtual_pipeline_model_parallel_size={m.virtual_pipeline_model_parallel_size} "
                f"is supported only on '{LANGUAGE}' (an encoder's stages run plain, forwards then backwards); use 1"
            )

    def _check_encoder_context(self) -> None:
        """An encoder has CP > 1 only in a homogeneous layout (the language model's, CP included): there its CP
        ranks split each replica's items, and elsewhere its replicas are its DP."""
        for name, m in self.module_parallelisms.items():
            if name != LANGUAGE and m.context_parallel_size > 1 and self.deployment != "homogeneous":
                raise LayoutError(
                    f"module '{name}': context_parallel_size={m.context_parallel_size} is supported for a modality "
                    f"module only in a homogeneous layout (the same layout as '{LANGUAGE}'); use 1, and "
                    f"data_parallel_size for more replicas"
                )

    def _check_topology(self) -> None:
        for src, dst in self.edges:
            for end in (src, dst):
                if end not in self.module_parallelisms:
                    raise LayoutError(f"edge {src} -> {dst}: no module '{end}'; modules are {self.module_names}")
            if src == dst:
                raise LayoutError(f"edge {src} -> {dst}: a module cannot feed itself")

    def _check_spans(self, world_size: int) -> None:
        items = sorted(self.module_parallelisms.items(), key=lambda kv: (kv[1].rank_offset, kv[0]))
        for name, m in items:
            if m.span.stop > world_size:
                raise LayoutError(
                    f"module '{name}' ({m.describe()}) runs past world_size {world_size}: it needs ranks up to "
                    f"{m.span.stop - 1}; lower its offset or sizes, or use world_size >= {m.span.stop}"
                )
        spans = _distinct_spans(items)
        for (a_names, a), (b_names, b) in zip(spans, spans[1:], strict=False):
            if b.start < a.stop:
                raise LayoutError(
                    f"modules {_names(a_names)} ({_ranks(a)}) and {_names(b_names)} ({_ranks(b)}) "
                    f"partially overlap; two spans must either coincide (colocated) or be disjoint (heterogeneous)"
                )
            if b.start > a.stop:
                raise LayoutError(
                    f"{_ranks(range(a.stop, b.start))} between modules {_names(a_names)} ({_ranks(a)}) and "
                    f"{_names(b_names)} ({_ranks(b)}): no module holds them; spans must be "
                    f"contiguous — start {_names(b_names)} at rank {a.stop}"
                )
        first, last = spans[0][1], spans[-1][1]
        if last.stop < world_size:
            raise LayoutError(
                f"{_ranks(range(last.stop, world_size))} after the last module {_names(spans[-1][0])}: no module "
                f"holds them; use world_size {last.stop} or extend a module's span to rank {world_size - 1}"
            )
        if first.start > 0:
            warnings.warn(
                f"{_ranks(range(0, first.start))} before the first module {_names(spans[0][0])}: no module "
                f"holds them, so they will be stub ranks (no parameters); if unintended, start a module at 0",
                UserWarning,
                stacklevel=3,
            )

    def _check_edges(self) -> None:
        for src, dst in self.edges:
            a = self.module_parallelisms[src].data_parallel_size
            b = self.module_parallelisms[dst].data_parallel_size
            if a % b and b % a:
                raise LayoutError(
                    f"edge {src} -> {dst}: data_parallel_size {a} ({src}) and {b} ({dst}) do not divide one "
                    f"another, so samples cannot be fanned in or out between the replicas; choose DP sizes "
                    f"where one is a multiple of the other"
                )

    def validate_batch(self, global_batch_size: int, num_microbatches: int = 1) -> int:
        """Check that every module's DP size splits each micro-batch; returns the micro-batch size."""
        if num_microbatches < 1 or global_batch_size < 1:
            raise LayoutError(
                f"global_batch_size ({global_batch_size}) and num_microbatches ({num_microbatches}) must be >= 1"
            )
        if global_batch_size % num_microbatches:
            raise LayoutError(
                f"global_batch_size {global_batch_size} is not divisible by num_microbatches {num_microbatches}"
            )
        micro = global_batch_size // num_microbatches
        for name, m in self.module_parallelisms.items():
            try:  # the interleaved order runs the micro-batches in groups of PP
                check_interleaving(m.pipeline_model_parallel_size, m.virtual_pipeline_model_parallel_size,
                                   num_microbatches)
            except ValueError as e:
                raise LayoutError(f"module '{name}': {e}") from None
            if micro % m.data_parallel_size:
                raise LayoutError(
                    f"module '{name}': micro-batch size {micro} (global batch {global_batch_size} / "
                    f"{num_microbatches} micro-batches) is not divisible by its data_parallel_size "
                    f"{m.data_parallel_size}; use a global batch that is a multiple of "
                    f"{num_microbatches * m.data_parallel_size}"
                )
        return micro


def _distinct_spans(items: list[tuple[str, ModuleParallelismConfig]]) -> list[tuple[list[str], range]]:
    """Group modules by span (colocated modules share one), sorted by start rank."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, m in items:
        groups.setdefault((m.span.start, m.span.stop), []).append(name)
    return [(names, range(*key)) for key, names in sorted(groups.items())]


def _ranks(r: range) -> str:
    """'rank 3' or 'ranks 2-5' for a contiguous range of ranks."""
    return f"rank {r.start}" if len(r) == 1 else f"ranks {r.start}-{r.stop - 1}"


def _names(names: list[str]) -> str:
    """'images' or 'images', 'audio' for messages."""
    return ", ".join(f"'{n}'" for n in names)
