"""Where mimo must lean on torch's internals, each with a tripwire test (tests/test_torch_compat.py):

- mends for bugs of the older torch releases mimo runs on (the GPU machine has 2.11), each applied only where that
  release's code is the one with the bug, and harmless elsewhere;
- reading a DCP checkpoint without ever unpickling what a file says: torch's `FileSystemReader.read_metadata`
  (2.13 too) is a plain `pickle.load` of `.metadata`, and `DefaultLoadPlanner.load_bytes` a
  `torch.load(weights_only=False)` of any entry `.metadata` marks as bytes. `SafeReader` unpickles `.metadata`
  with an allow-list of DCP's metadata classes; `SafePlanner` loads bytes entries with `weights_only=True` (mimo
  writes none, and refuses any before loading: this is the second lock); `storage_files` names the files
  `.metadata` points into (DCP's `_StorageInfo`);
- compiler switches torch has no public home for: whether dynamo is loaded yet (`compiler_loaded`: without it,
  `torch.compiler.disable` would import it, seconds per process) and inductor's `emulate_precision_casts`
  (`emulate_precision_casts`, float8 rowwise under compile).
"""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.tensor import _redistribute
from torch.distributed.tensor.placement_types import Shard

DCP_METADATA = ".metadata"  # DCP's index of a checkpoint (`__<rank>.metadata` for a rank's own, unused by mimo)


def contiguous_uneven_gathers() -> None:
    """A dimension that does not split evenly over a mesh dimension (a ViT's 577 tokens over TP2, 13 text tokens
    over TP2) is all-gathered padded, then narrowed: a tensor that is not contiguous. torch before its nested
    redistribute (2.11) labels such a gather in backward with the incoming gradient's contiguous strides, and the
    next linear's backward view of it fails ("view size is not compatible with input tensor's size and stride").
    Sequence parallelism meets it on every block. The narrowed gather is made contiguous here (a copy, only when
    the dimension was padded)."""
    if hasattr(_redistribute, "NestedRedistribute") or getattr(Shard._maybe_unpad_tensor, "mimo_contiguous", False):
        return
    narrowed = Shard._maybe_unpad_tensor

    def unpadded(self: Shard, local_tensor: torch.Tensor, logical_dim_size: int, num_chunks: int) -> torch.Tensor:
        result = narrowed(self, local_tensor, logical_dim_size, num_chunks)
        return result if result is local_tensor else result.contiguous()

    unpadded.mimo_contiguous = True  # type: ignore[attr-defined]
    Shard._maybe_unpad_tensor = unpadded


# -- reading a DCP checkpoint without executing it ---------------------------------------------------------------
class SafeReader(FileSystemReader):
    """DCP's filesystem reader, but its pickled `.metadata` is read with an allow-list unpickler.

    Only DCP's metadata classes, its `_StorageInfo`, `torch.Size`, dtypes, layouts and paths may be built; any
    other global (`os.system`, `builtins.eval`, ...) is refused before it is called."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Unpickle `.metadata` with the allow-list; set the load id as DCP's own reader does."""
        rank_ = kwargs.get("rank")
        name = DCP_METADATA if rank_ is None else f"__{rank_}{DCP_METADATA}"
        metadata = _AllowListUnpickler(io.BytesIO(Path(self.path, name).read_bytes())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"expected DCP Metadata, found {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _AllowListUnpickler(pickle.Unpickler):
    """Builds only what DCP metadata is made of; refuses every other global."""

    _CLASSES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        """Allow DCP metadata classes, torch dtypes and the few helpers above."""
        allowed = (module, name) in self._CLASSES
        if module == dcp_metadata.__name__:
            cls = getattr(dcp_metadata, name, None)
            allowed = isinstance(cls, type) and cls.__module__ == module
        elif module == "torch":
            allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, but a bytes entry is read with `torch.load(weights_only=True)` (torch's own
    planner unpickles it with `weights_only=False`: a file could run anything). The state dict is flat."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Only tensors, containers and plain values come out of a bytes entry; anything else is refused."""
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def storage_files(metadata: Metadata) -> dict[str, tuple[str, ...]]:
    """{file name: transforms} of every file DCP's `.metadata` sends reads into (each entry's `_StorageInfo`)."""
    return {info.relative_path: tuple(info.transform_descriptors or ()) for info in metadata.storage_data.values()}


def compiler_loaded() -> bool:
    """Whether torch.compile's frontend (dynamo) is imported in this process: something was compiled, or will be.
    Code that keeps itself out of compiled graphs (`torch.compiler.disable`) asks first, since that call imports
    dynamo itself."""
    return "torch._dynamo" in sys.modules


def emulate_precision_casts() -> None:
    """Inductor rounds to low precision where eager does (process-wide): torchtitan's mend for float8 rowwise
    under compile, whose recomputed casts otherwise differed from the forward's (pytorch#150859, torchtitan#1056)."""
    import torch._inductor.config as inductor

    inductor.emulate_precision_casts = True
