"""Hugging Face safetensors → this rank's parameters, reading only the slices the rank hosts.

`HFWeights` is a `ParameterSource` for `init_parameters`: the provider builds the rank's model on the meta
device (its pipeline stage only), applies tensor parallelism, and `init_parameters` then asks `fill` for each
parameter; `fill` opens the tensor lazily (`safe_open(...).get_slice`) and reads exactly the rows/columns of
the rank's DTensor shard (`compute_local_shape_and_global_offset`), so no rank ever holds a whole tensor it
does not host. Parameters no rule names (a fresh projector) keep their seeded values.

A family maps its mimo names to the files' names with `NameRule`s (LLaVA's: `mimo.families.llava.hf_load`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


class HFLoadError(ValueError):
    """A Hugging Face directory whose tensors do not fit the model its config describes."""


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # stored dtypes a float parameter is read from (and cast)


class SafetensorsDir:
    """The tensors of a local Hugging Face directory: names → file (from the shard index, or every
    `*.safetensors` file), each file opened lazily once."""

    def __init__(self, directory: str | Path) -> None:
        """Index the directory's tensors by name; nothing is read yet."""
        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.directory / file for name, file in _weight_map(index).items()}
            for path in sorted(set(self.files.values())):
                if not path.is_file():
                    raise HFLoadError(f"{index}: names shard {path.name}, which is not in {self.directory} (an "
                                      f"incomplete download?)")
        else:
            for path in sorted(self.directory.glob("*.safetensors")):
                with open_safetensors(path) as f:
                    self.files.update(dict.fromkeys(f.keys(), path))
        if not self.files:
            raise HFLoadError(f"{self.directory}: no safetensors weights (model.safetensors or a sharded index); "
                              f"mimo reads only safetensors, never pickled .bin files")
        self._open: dict[Path, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a `RunPlan` handed to spawned workers) without its open files: each process opens its own."""
        return {**self.__dict__, "_open": {}}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        """Every tensor name in the directory."""
        return sorted(self.files)

    def slice(self, name: str) -> Any:
        """The lazy slice handle of tensor `name` (shape and dtype known, nothing read until indexed)."""
        path = self.files[name]
        if path not in self._open:
            self._open[path] = open_safetensors(path)
        try:
            return self._open[path].get_slice(name)
        except SafetensorError:
            raise HFLoadError(f"{path}: holds no tensor {name}, which its shard index places there") from None


def _weight_map(index: Path) -> dict[str, str]:
    """A shard index's tensor name -> file map, or an HFLoadError saying what is wrong with it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise HFLoadError(f"{index}: not a shard index (JSON with a weight_map of tensor name -> file)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise HFLoadError(f"{index}: its weight_map must map tensor names to file names")
    return weight_map


def open_safetensors(path: Path) -> Any:
    """`safe_open` of one file, or a one-line HFLoadError for a file that is not whole safetensors (truncated,
    corrupt header) or cannot be read."""
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as e:
        raise HFLoadError(f"{path}: not a readable safetensors file ({e}); is it truncated? download or copy it "
                          f"again") from None


@dataclass(frozen=True)
class NameRule:
    """mimo names starting with `prefix` live in `checkpoint` under the first of `hf_prefixes` that exists."""

    prefix: str
    checkpoint: SafetensorsDir
    hf_prefixes: tuple[str, ...]

    def candidates(self, name: str) -> list[str]:
        """The file names `name` may have, most current first."""
        rest = name[len(self.prefix):]
        return [p + rest for p in self.hf_prefixes]


@dataclass
class HFWeights:
    """A `ParameterSource` over name rules; `reads` records (file name, local shape) of every read. The parameters
    named in `padded_rows` (a vocabulary padded for tensor parallelism: embedding, output head) may have more
    rows than their stored tensor: those rows are zeros."""

    rules: Sequence[NameRule]
    reads: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    padded_rows: frozenset[str] = frozenset()

    def __copy__(self) -> HFWeights:
        """The same rules (and directories) with a read log of its own: one per model build (`provider.placed`)."""
        return HFWeights(self.rules, padded_rows=self.padded_rows)

    def rule(self, name: str) -> NameRule | None:
        """The first rule whose prefix `name` starts with."""
        return next((r for r in self.rules if name.startswith(r.prefix)), None)

    def hf_name(self, name: str) -> str:
        """The file's name for mimo parameter `name`; an error naming every name tried if none exists."""
        rule = self.rule(name)
        if rule is None:
            raise HFLoadError(f"{name} is not in any Hugging Face directory of this model")
        candidates = rule.candidates(name)
        found = next((c for c in candidates if c in rule.checkpoint), None)
        if found is None:
            raise HFLoadError(f"{rule.checkpoint.directory}: no tensor for {name} (looked for {candidates}); the "
                              f"directory does not hold the model its config.json describes")
        return found

    def check(self, name: str, param: torch.Tensor) -> bool:
        """Whether a rule covers `name`; if so its tensor must exist with `param`'s shape and a float dtype (read
        from the file's header only: `mimo validate` checks every parameter so, before any worker)."""
        rule = self.rule(name)
        if rule is None:
            return False
        self._stored(rule, name, param)
        return True

    def _stored(self, rule: NameRule, name: str, param: torch.Tensor) -> tuple[str, Any]:
        """(file name, lazy slice) of `name`, whose shape is `param`'s and whose dtype is a float one (an int8
        `q_proj` is a quantized or damaged file, which a cast would silently turn into other weights)."""
        key = self.hf_name(name)
        lazy = rule.checkpoint.slice(key)
        stored = tuple(lazy.get_shape())
        padded = name in self.padded_rows and stored[1:] == tuple(param.shape[1:]) and stored[0] <= param.shape[0]
        if stored != tuple(param.shape) and not padded:
            raise HFLoadError(f"{rule.checkpoint.directory}: {key} has shape {list(stored)}, but the model its "
                              f"config.json describes needs {list(param.shape)} for {name}")
        if lazy.get_dtype() not in FLOAT_DTYPES:
            raise HFLoadError(f"{rule.checkpoint.directory}: {key} is stored as {lazy.get_dtype()}, but its "
                              f"config.json declares no quantization; mimo reads floating-point weights only "
                              f"({', '.join(FLOAT_DTYPES)})")
        return key, lazy

    def fill(self, name: str, param: torch.Tensor) -> bool:
        """Read this rank's part of `name` into `param`; False for a name no rule covers (kept seeded)."""
        rule = self.rule(name)
        if rule is None:
            return False
        key, lazy = self._stored(rule, name, param)
        local = param.to_local() if isinstance(param, DTensor) else param
        values = lazy[_held_slices(param, lazy.get_shape())]
        self.reads.append((key, tuple(values.shape)))
        if values.shape == local.shape:
            local.copy_(values.to(local.dtype))
        else:  # a padded vocabulary's rows past the file's: zeros
            local[:values.shape[0]].copy_(values.to(local.dtype))
            local[values.shape[0]:].zero_()
        return True


def _held_slices(param: torch.Tensor, stored: Sequence[int]) -> tuple[slice, ...]:
    """This rank's shard of `param` within the stored tensor: its rows cut at the stored rows (a padded vocabulary's
    last shard holds rows the file has not)."""
    slices = _local_slices(param)
    if not slices:
        return slices
    rows = slices[0]
    return (slice(min(rows.start, stored[0]), min(rows.stop, stored[0])), *slices[1:])


def _local_slices(param: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's shard in the whole tensor (everything for a plain tensor)."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


SAMPLES, SAMPLE_BYTES = 16, 1 << 16  # a weight file's fingerprint reads 16 slices of 64 KiB, spread over it


def fingerprint(directory: str | Path) -> dict[str, Any]:
    """A cheap identity of a Hugging Face directory's weights, for a checkpoint that leaves them out: the SHA-256 of
    config.json (and of the shard index, if any), every safetensors file's name and size, and a SHA-256 of
    `SAMPLES` slices spread over each (1 MiB read a file: a fine-tune or another revision of the same shapes
    changes nearly every byte, so the same sizes alone would not tell them apart)."""
    directory = Path(directory)
    small = [name for name in ("config.json", "model.safetensors.index.json") if (directory / name).is_file()]
    weights = sorted(directory.glob("*.safetensors"))
    return {"sha256": {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in small},
            "sizes": {p.name: p.stat().st_size for p in weights},
            "samples": {p.name: sampled_sha256(p) for p in weights}}


def sampled_sha256(path: Path) -> str:
    """SHA-256 of `SAMPLES` slices of `SAMPLE_BYTES` at evenly spaced offsets (the whole file if it is smaller)."""
    size, digest = path.stat().st_size, hashlib.sha256()
    last = max(size - SAMPLE_BYTES, 0)
    with path.open("rb") as f:
        for offset in sorted({i * last // (SAMPLES - 1) for i in range(SAMPLES)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def fingerprint_difference(recorded: dict[str, Any], actual: dict[str, Any]) -> str:
    """How `actual` differs from `recorded` (both `fingerprint`s), in a few words; '' if they agree."""
    for name in sorted({*recorded.get("sha256", {}), *actual.get("sha256", {})}):
        if recorded.get("sha256", {}).get(name) != actual.get("sha256", {}).get(name):
            return f"its {name} differs" if name in actual.get("sha256", {}) else f"it has no {name}"
    was, now = recorded.get("sizes", {}), actual.get("sizes", {})
    for name in sorted({*was, *now}):
        if was.get(name) != now.get(name):
            if name not in now:
                return f"it has no {name}"
            return f"{name} is new there" if name not in was else f"{name} is {now[name]} bytes, not {was[name]}"
    was, now = recorded.get("samples", {}), actual.get("samples", {})
    for name in sorted(was):
        if was[name] != now.get(name):
            return f"{name} holds other weights of the same size"
    return ""


__all__ = ["HFLoadError", "HFWeights", "NameRule", "SafetensorsDir", "fingerprint", "fingerprint_difference"]
