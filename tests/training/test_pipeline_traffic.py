"""What the pipeline and the bridges post point to point, recorded on gloo and checked for NCCL (issue 29).

NCCL ignores tags: it runs a pair of ranks' messages on one group on one communicator and stream, in posting
order. So for every pair and group, the i-th message one rank posts toward the other must be the i-th the other
posts from it (a send met by a receive of the same tag and size), or NCCL pairs the wrong messages, or waits
forever where both post a send first. `nccl_mismatches` checks recorded traces for that. One world of 4 gloo
ranks runs `PipelineSchedule` alone (1F1B and interleaved, PP 2 and 4) with its real groups, and, to show the
check bites, with the seam's messages on the ordinary groups (the routing before the seam had its own: at PP 2
the two directions meet on one pair) and with a rank that swaps two of its sends.

Frozen-aware traffic: one world of 4 gloo ranks trains, float64, 3 steps, a 4-layer language model at PP 2 × VPP 2
(a) behind a frozen encoder and projection on their own ranks (images DP 2 on 0-1): the encoder ranks receive no
gradient and stage 0 sends none; (b) LLaVA stage 1 over it (frozen tower and language model, the projection
trains): every rows message gets its gradient back through both chunks of both stages; (c) colocated with a
frozen encoder and projection (images DP 4): no reduce-scatter. Each run's losses and parameters equal one
process's to 1e-8, the heterogeneous runs' messages pass `nccl_mismatches`, and every (pair, group) a step uses
was opened before it (`P2PGroups.warm_up`).

Two encoders on one rank feeding one language rank (images and audio on rank 0, the language model on rank 1)
share a (pair, group): the encoder rank must send as stage 0 receives, micro-batch by micro-batch, each edge in
turn (it sent every images micro-batch before the first audio one), and take the gradients back in that order.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

from mimo.config import MimoParallelismConfig
from mimo.grid import P2PGroups, build_p2p_groups
from mimo.models import Decoder, DecoderConfig
from mimo.provider import MimoModelProvider, ModuleSpec
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.pipeline import PipelineSchedule, StageWork
from mimo.training.step import MimoTrainer
from tests.test_provider import modality_spec
from tests.training import test_parity
from tests.training.test_parity import CLIP, DDP, OPTIM, TOKENS, batches, full_params, train_one_process

Message = tuple[str, int, str, int, int]  # (send | recv, peer global rank, group, tag, elements)
SHAPE = (2, 3)


def nccl_mismatches(traces: list[list[Message]]) -> list[str]:
    """Every (pair, group) whose two ranks' posting orders NCCL would pair wrongly: the i-th message of each must
    be the two ends of one message (a send and a receive of the same tag and size); the first misfit of each."""
    streams: dict[tuple[int, int, str], list[tuple[str, int, int]]] = defaultdict(list)
    for rank, trace in enumerate(traces):
        for op, peer, group, tag, numel in trace:
            streams[rank, peer, group].append((op, tag, numel))
    problems = []
    for a, b, group in sorted({(min(r, p), max(r, p), g) for r, p, g in streams}):
        pairs = itertools.zip_longest(streams.get((a, b, group), []), streams.get((b, a, group), []))
        for i, (mine, theirs) in enumerate(pairs):
            if mine is None or theirs is None or mine[0] == theirs[0] or mine[1:] != theirs[1:]:
                problems.append(f"ranks {a}-{b} on {group}, message {i}: rank {a} posts {mine}, rank {b} {theirs}")
                break
    return problems


class Recorder:
    """Notes every point-to-point message this process posts, in order, while installed (the real call runs)."""

    def __init__(self, groups: P2PGroups | None = None) -> None:
        """`groups` name the p2p groups in the trace; others go by torch's group name (the same on every rank)."""
        named = vars(groups).items() if groups is not None else ()
        self.names = {id(g): name for name, g in named if g is not None}
        self.trace: list[Message] = []
        self._patch = pytest.MonkeyPatch()

    def __enter__(self) -> Recorder:
        for name, op in (("isend", "send"), ("send", "send"), ("irecv", "recv"), ("recv", "recv")):
            self._patch.setattr(dist, name, self._recording(getattr(dist, name), op))
        return self

    def __exit__(self, *exc) -> None:
        self._patch.undo()

    def _recording(self, fn, op: str):
        @functools.wraps(fn)
        def call(tensor, peer=None, group=None, tag=0, **kwargs):
            peer = kwargs.pop("dst", kwargs.pop("src", peer))
            name = self.names.get(id(group), "default" if group is None else group.group_name)
            self.trace.append((op, peer, name, tag, tensor.numel()))
            return fn(tensor, peer, group=group, tag=tag, **kwargs)
        return call


class _SwappedSends(PipelineSchedule):
    """Rank 0 runs its first two forwards the other way round: gloo matches by tag and does not mind."""

    def order(self) -> list[tuple[str, int, int]]:
        ops = super().order()
        return [ops[1], ops[0], *ops[2:]] if self.stage == 0 else ops


def _weight(virtual_stage: int) -> float:
    return 1.0 + 0.1 * virtual_stage


def _run_schedule(pp_group, groups: P2PGroups, chunks: int, micro: int,
                  schedule_type: type[PipelineSchedule] = PipelineSchedule) -> tuple[list[Message], list[float]]:
    """One step of `schedule_type` over `pp_group`: chunk c of stage s multiplies by weight c·PP + s, the last
    virtual stage sums; this rank's trace and its weights' gradients."""
    stages, stage = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    weights = [torch.tensor(_weight(c * stages + stage), dtype=torch.float64, requires_grad=True)
               for c in range(chunks)]
    shapes = [[SHAPE] * micro for _ in range(chunks)]
    schedule = schedule_type(pp_group, micro, shapes if chunks > 1 else shapes[0], torch.float64,
                             p2p_groups=groups, chunks=chunks)

    def forward(m: int, c: int, x):
        x = torch.full(SHAPE, m + 1.0, dtype=torch.float64) if x is None else x
        out = x * weights[c]
        return out.sum() if schedule.last(c) else out

    with Recorder(groups) as recorder:
        schedule.run(StageWork(forward))
    return recorder.trace, [float(w.grad) for w in weights]


def _schedules(rank: int, world_size: int) -> dict:
    """Every case of the module docstring on this rank: {case: (trace, gradients)}."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp2, pp4 = pairs[rank // 2], dist.new_group([0, 1, 2, 3])
    groups = build_p2p_groups(seam=True)
    shared = P2PGroups(groups.forward, groups.backward, groups.forward, groups.backward)  # no seam groups
    return {"pp2": _run_schedule(pp2, groups, 1, 3), "pp4": _run_schedule(pp4, groups, 1, 5),
            "pp2-vpp2": _run_schedule(pp2, groups, 2, 4), "pp2-vpp3": _run_schedule(pp2, groups, 3, 6),
            "pp4-vpp2": _run_schedule(pp4, groups, 2, 8),
            "pp2-vpp2-seam-shared": _run_schedule(pp2, shared, 2, 4),
            "pp4-swapped": _run_schedule(pp4, groups, 1, 4, _SwappedSends)}


def _expected_gradient(stages: int, chunks: int, micro: int, virtual_stage: int) -> float:
    """d/dw_v of Σ_m Σ (m+1)·Π_v w_v over a [2, 3] input: Σ_m 6(m+1) · Π w / w_v."""
    product = 1.0
    for v in range(stages * chunks):
        product *= _weight(v)
    return sum(6.0 * (m + 1) for m in range(micro)) * product / _weight(virtual_stage)


def test_pipeline_posts_every_pair_in_the_same_order_on_both_ends():
    results = run_distributed(_schedules, 4)
    cases = {"pp2": (2, 1, 3), "pp4": (4, 1, 5), "pp2-vpp2": (2, 2, 4), "pp2-vpp3": (2, 3, 6),
             "pp4-vpp2": (4, 2, 8)}
    for case, (stages, chunks, micro) in cases.items():
        assert nccl_mismatches([r[case][0] for r in results]) == [], case
        for rank, r in enumerate(results):
            want = [_expected_gradient(stages, chunks, micro, c * stages + rank % stages) for c in range(chunks)]
            assert r[case][1] == pytest.approx(want, rel=1e-12), f"{case}: rank {rank}"
    # the seam gets its own groups: on one pair's ordinary groups both ranks would post a send first
    seam = [r["pp2-vpp2"][0] for r in results]
    assert {g for trace in seam for _, _, g, _, _ in trace} == {"forward", "backward", "seam_forward",
                                                                "seam_backward"}
    shared = nccl_mismatches([r["pp2-vpp2-seam-shared"][0] for r in results])
    assert shared and all(p.startswith(("ranks 0-1 on", "ranks 2-3 on")) for p in shared), shared
    swapped = nccl_mismatches([r["pp4-swapped"][0] for r in results])
    assert swapped == [f"ranks 0-1 on forward, message 0: rank 0 posts ('send', {1 << 20 | 2}, 6), rank 1 "
                       f"('recv', {1 << 20}, 6)"], swapped


def test_the_check_reports_reordered_or_unmatched_messages():
    good = [[("send", 1, "f", 10, 4), ("send", 1, "f", 12, 4)], [("recv", 0, "f", 10, 4), ("recv", 0, "f", 12, 4)]]
    assert nccl_mismatches(good) == []
    swapped = [good[0][::-1], good[1]]
    assert nccl_mismatches(swapped) == ["ranks 0-1 on f, message 0: rank 0 posts ('send', 12, 4), rank 1 "
                                        "('recv', 10, 4)"]
    both_send = [[("send", 1, "f", 10, 4)], [("send", 0, "f", 11, 4)]]
    assert len(nccl_mismatches(both_send)) == 1
    unmatched = [good[0], good[1][:1]]
    assert nccl_mismatches(unmatched) == ["ranks 0-1 on f, message 1: rank 0 posts ('send', 12, 4), rank 1 None"]
    assert nccl_mismatches([good[0], [(*m[:2], "b", *m[3:]) for m in good[1]]]) != []  # another group


# -- frozen-aware traffic through the trainer -------------------------------------------------------------
MICRO = 2
VPP_LANGUAGE = {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}
HETEROGENEOUS = {"images": {"data_parallel_size": 2},
                 "language": {**VPP_LANGUAGE, "data_parallel_size": 1, "rank_offset": 2}}
COLOCATED = {"images": {"data_parallel_size": 4}, "language": {**VPP_LANGUAGE, "data_parallel_size": 2}}
FROZEN_TOWER = {"freeze_modality_encoders": {"images": True}, "freeze_modality_projections": {"images": True}}
STAGE1 = {"freeze_modality_encoders": {"images": True}, "freeze_language_model": True}
RUNS = {"frozen-tower": (HETEROGENEOUS, FROZEN_TOWER), "stage1": (HETEROGENEOUS, STAGE1),
        "colocated-frozen-tower": (COLOCATED, FROZEN_TOWER)}


def _provider(layout: dict | None, freezing: dict) -> MimoModelProvider:
    config = None if layout is None else MimoParallelismConfig.from_dict(layout)
    return MimoModelProvider(ModuleSpec(Decoder, {"config": DecoderConfig.tiny(num_layers=4)}),
                             {"images": modality_spec("images")}, {"images": TOKENS["images"]}, config,
                             params_dtype=torch.float64, seed=3, **freezing)


def _reference(freezing: dict) -> tuple[list, list, dict]:
    """One process: every step's loss and gradient norm (Adam and clipping would hide a wrongly scaled gradient),
    and the final parameters."""
    model = _provider(None, freezing).provide()
    losses, norms = train_one_process(model, batches(("images",)), MICRO)
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(layout: dict, freezing: dict) -> dict:
    """3 steps on this rank: losses, parameters, the messages the trainer's build posted (its warm-up) and the
    steps', and how many reduce-scatters the steps ran."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = _provider(layout, freezing)
        model = prov.provide_distributed_model()
    infra = prov.build_infra()
    with Recorder(infra.p2p_groups) as built:
        trainer = MimoTrainer(model, infra, hidden_size=64, global_batch_size=8, num_microbatches=MICRO,
                              optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64)
    scatters = []
    patch = pytest.MonkeyPatch()
    patch.setattr(dist, "reduce_scatter", functools.partial(_counted, dist.reduce_scatter, scatters))
    try:
        with Recorder(infra.p2p_groups) as steps:
            results = [trainer.train_step(batch) for batch in batches(("images",))]
    finally:
        patch.undo()
    return {"losses": [r.loss for r in results], "norms": [r.grad_norm for r in results],
            "params": full_params(model), "opened": built.trace, "trace": steps.trace,
            "reduce_scatters": len(scatters)}


def _counted(fn, calls: list, *args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)


def _frozen_runs(rank: int, world_size: int) -> dict:
    return {name: _train(layout, freezing) for name, (layout, freezing) in RUNS.items()}


def _messages(trace: list[Message], op: str, group: str, peers: range) -> int:
    return sum(1 for o, peer, g, _, _ in trace if o == op and g == group and peer in peers)


def test_frozen_modules_move_no_gradient_they_do_not_need():
    results = run_distributed(_frozen_runs, 4, timeout_s=240)
    encoders, language = range(0, 2), range(2, 4)
    for name, (_, freezing) in RUNS.items():
        ref_losses, ref_norms, ref_params = _reference(freezing)
        for rank, r in enumerate(results):
            run = r[name]
            assert run["losses"] == pytest.approx(ref_losses, rel=1e-8), f"{name}: rank {rank}"
            assert run["norms"] == pytest.approx(ref_norms, rel=1e-8), f"{name}: rank {rank}"
            assert_matches_reference(run["params"], ref_params, f"{name}: rank {rank}")
            opened = {(peer, g) for _, peer, g, _, _ in run["opened"]}
            assert {(peer, g) for _, peer, g, _, _ in run["trace"]} <= opened, f"{name}: rank {rank}"
        assert set().union(*(r[name]["params"] for r in results)) == set(ref_params), name
    for name in ("frozen-tower", "stage1"):
        assert nccl_mismatches([r[name]["trace"] for r in results]) == [], name
    rows = {name: sum(_messages(results[e][name]["trace"], "send", "forward", language) for e in encoders)
            for name in ("frozen-tower", "stage1")}
    grads = {name: sum(_messages(results[e][name]["trace"], "recv", "backward", language) for e in encoders)
             for name in ("frozen-tower", "stage1")}
    sent_back = {name: sum(_messages(results[s][name]["trace"], "send", "backward", encoders) for s in language)
                 for name in ("frozen-tower", "stage1")}
    assert rows["frozen-tower"] == rows["stage1"] > 0
    assert grads == sent_back == {"frozen-tower": 0, "stage1": rows["stage1"]}
    assert [r["colocated-frozen-tower"]["reduce_scatters"] for r in results] == [0] * 4


# -- two encoders on one rank -----------------------------------------------------------------------------
SHARED_ENCODER_RANK = {"images": {"data_parallel_size": 1}, "audio": {"data_parallel_size": 1},
                       "language": {"data_parallel_size": 1, "rank_offset": 1}}


def _two_encoders(rank: int, world_size: int) -> dict:
    """The parity run of the two-encoder layout (`test_parity.train_layout`), with every message recorded."""
    with Recorder() as recorder:
        out = test_parity.train_layout(rank, world_size, SHARED_ENCODER_RANK, ("images", "audio"), False, False, DDP)
    return {**out, "trace": recorder.trace}


def test_two_encoders_on_one_rank_send_in_the_order_stage_0_receives():
    results = run_distributed(_two_encoders, 2)
    assert nccl_mismatches([r["trace"] for r in results]) == []
    losses, norms, params = test_parity.cached_reference(("images", "audio"), False, False)
    for rank, r in enumerate(results):
        assert r["losses"] == pytest.approx(losses, rel=1e-8) and r["norms"] == pytest.approx(norms, rel=1e-8), rank
        assert_matches_reference(r["params"], params, f"rank {rank}")
