"""Compiled blocks (`train.compile`, `mimo.distributed.compile_blocks`) called from another thread.

On a GPU the autograd engine runs the backward on a device thread of its own, and a recomputed block
(`recompute_granularity: full`) runs its compiled forward there. That thread has its own intra-op thread count, on
which every compiled frame guards, and (torch 2.12+) its own dynamo config: before the fix, each block compiled
once more for the count alone and its recompile limit was torch's default 8 there (LLaVA-7B on an H200: 8
compilations of the decoder block in 7 steps). On the CPU the backward runs on the calling thread, so this test
calls the block from a plain thread set up as the device thread would be.
"""

from __future__ import annotations

import functools
import threading
from unittest import mock

import torch
from torch._dynamo.utils import counters

from mimo.distributed import BLOCK_RECOMPILE_LIMIT, compile_blocks
from mimo.models import Decoder, DecoderConfig, init_parameters


def test_a_block_called_from_a_thread_of_another_thread_count_compiles_nothing_new():
    torch._dynamo.reset()
    decoder = Decoder(DecoderConfig.tiny())
    init_parameters(decoder, seed=0)
    with mock.patch.object(torch, "compile", functools.partial(torch.compile, backend="eager")):
        compile_blocks(decoder, tp=1)
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        want = decoder(input_ids=ids)
        graphs = counters["stats"]["unique_graphs"]
        seen = {}

        def device_thread() -> None:
            torch.set_num_threads(torch.get_num_threads() + 1)  # the autograd thread's count differs
            seen["out"] = decoder(input_ids=ids)
            seen["limit"] = torch._dynamo.config.recompile_limit

        thread = threading.Thread(target=device_thread)
        thread.start()
        thread.join()
        assert counters["stats"]["unique_graphs"] == graphs, "the block compiled again in the other thread"
        assert seen["limit"] >= BLOCK_RECOMPILE_LIMIT
        torch.testing.assert_close(seen["out"], want, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
