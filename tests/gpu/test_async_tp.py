"""`tp_comm_overlap` (torch's asynchronous TP) on two GPUs: inductor fuses the compiled blocks' sequence-parallel
all-gathers and reduce-scatters with their matmuls, and the run trains like the same compiled TP2+SP without it.

float32 with TF32 off, 3 steps, the encoder DP2 and the language model TP2+SP beside it (colocated). The fused
ops chunk each matmul over the TP ranks' shards and sum the same products in another order, so the losses agree
to `RTOL` = 1e-5 relative, as tests/gpu/test_nccl_layouts.py's float32 rows do (its docstring says why).
The fusions are counted where inductor's pass makes them (`micro_pipeline_tp`: torch-internal, the only hook),
so a run in which nothing was fused fails instead of passing as plain TP.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

from mimo.distributed import DistributedConfig, ModuleDistributedConfig
from mimo.testing import run_distributed
from mimo.training.step import MimoTrainer
from tests.gpu.test_nccl_layouts import _batches, _tf32_off
from tests.training.test_parity import CLIP, GLOBAL_BATCH, MICRO, OPTIM, provider

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                reason=f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
RTOL = 1e-5


def train(rank: int, world_size: int, overlap: bool) -> dict:
    """3 float32 steps of colocated images DP2 + language TP2+SP, compiled; the losses and the fusions made."""
    from torch._inductor.fx_passes import micro_pipeline_tp as passes

    _tf32_off()
    fused = {"all_gather": 0, "reduce_scatter": 0}

    def counting(kind: str, fuse):
        def counted(*args, **kwargs):
            fused[kind] += 1
            return fuse(*args, **kwargs)
        return counted

    device = torch.device("cuda", torch.cuda.current_device())
    layout = {"images": {"data_parallel_size": 2},
              "language": {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "sequence_parallel": True,
                           "tp_comm_overlap": overlap}}
    gather, scatter = passes.fuse_all_gather_matmul, passes.fuse_matmul_reduce_scatter
    with warnings.catch_warnings(), \
            mock.patch.object(passes, "fuse_all_gather_matmul", counting("all_gather", gather)), \
            mock.patch.object(passes, "fuse_matmul_reduce_scatter", counting("reduce_scatter", scatter)):
        warnings.simplefilter("ignore")
        prov = provider(layout, ("images",), params_dtype=torch.float32, device=device)
        model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig("ddp", compile=True)))
        trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                              num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float32,
                              device=device)
        losses = [trainer.train_step(b).loss for b in _batches(3)]
    return {"losses": losses, "fused": fused}


def test_the_overlap_fuses_and_trains_like_plain_tp():
    plain = run_distributed(train, 2, False, backend="nccl", timeout_s=600, pg_timeout_s=300)
    overlapped = run_distributed(train, 2, True, backend="nccl", timeout_s=600, pg_timeout_s=300)
    print(f"\nfusions per rank: {[r['fused'] for r in overlapped]}; losses {overlapped[0]['losses']} against "
          f"{plain[0]['losses']}")
    for rank in range(2):
        assert plain[rank]["fused"] == {"all_gather": 0, "reduce_scatter": 0}
        assert overlapped[rank]["fused"]["all_gather"] > 0 and overlapped[rank]["fused"]["reduce_scatter"] > 0
        for got, want in zip(overlapped[rank]["losses"], plain[rank]["losses"], strict=True):
            assert abs(got - want) <= RTOL * abs(want), (rank, overlapped[rank]["losses"], plain[rank]["losses"])
