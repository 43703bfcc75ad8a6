"""`mimo.hf.shards.write_safetensors`: streamed tensors into one file or shards with the index transformers reads.

The writer `mimo export-hf` and the benchmarks' random directories share. Loading a sharded export in transformers
is `test_export.test_a_large_model_is_written_in_shards_with_an_index`; here: the files, the index, streaming.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from mimo.hf.load import SafetensorsDir
from mimo.hf.shards import INDEX_FILE, SINGLE_FILE, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    """Five float32 tensors of 400, 400, 800, 2000 and 400 bytes."""
    sizes = {"a": 100, "b": 100, "c": 200, "d": 500, "e": 100}
    return {name: torch.arange(n, dtype=torch.float32) + i for i, (name, n) in enumerate(sizes.items())}


def _read(directory) -> dict[str, torch.Tensor]:
    source = SafetensorsDir(directory)
    return {name: source.slice(name)[:] for name in source.names()}


def test_what_fits_one_shard_is_one_model_safetensors(tmp_path):
    tensors = _tensors()
    files = write_safetensors(tensors.items(), tmp_path, max_shard_bytes=10_000)
    assert files == [tmp_path / SINGLE_FILE] and sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    assert all(torch.equal(_read(tmp_path)[n], t) for n, t in tensors.items())


def test_shards_follow_the_limit_and_the_index_names_every_tensor(tmp_path):
    tensors = _tensors()
    write_safetensors(tensors.items(), tmp_path, max_shard_bytes=1000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    # a+b (800), c (800), d (2000: larger than the limit, alone), e (400); in the order given
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert index["weight_map"] == dict(zip("abcde", [names[0], names[0], names[1], names[2], names[3]], strict=True))
    assert index["metadata"] == {"total_size": 4000}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, INDEX_FILE])  # no provisional files left
    read = _read(tmp_path)
    assert read.keys() == tensors.keys() and all(torch.equal(read[n], t) for n, t in tensors.items())


def test_a_shard_is_on_disk_once_the_next_one_starts(tmp_path):
    """Streaming: a full shard is written as soon as a tensor overflows it, before the tensor after that is drawn,
    so a model larger than memory never has to be held whole."""
    on_disk: list[int] = []

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in _tensors().items():
            on_disk.append(len(list(tmp_path.glob("*.part"))))
            yield name, tensor

    write_safetensors(stream(), tmp_path, max_shard_bytes=1000)
    assert on_disk == [0, 0, 0, 1, 2]  # drawing c closes a+b, d closes c, e closes d


def test_a_name_given_twice_is_refused(tmp_path):
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="tensor 'a' is given twice; each name must be written once"):
        write_safetensors([("a", t), ("b", t), ("a", t)], tmp_path, max_shard_bytes=4)
