"""Pipeline orders (1F1B, Megatron's interleaved 1F1B, forward-only stages) replayed by the schedule simulator:
every micro-batch's work once, no deadlock, and the bubble the textbook formulas give."""

from __future__ import annotations

import pytest

from mimo.training.schedules import (
    Op,
    check_interleaving,
    forward_only,
    interleaved_one_f_one_b,
    one_f_one_b,
    simulate,
)


def _pipeline(stages: int, chunks: int, microbatches: int, forward: float = 1.0, backward: float = 2.0):
    """The orders, stage numbering and per-stage times of a language pipeline with `chunks` chunks per rank
    (each chunk 1/chunks of a rank's layers)."""
    orders = {r: interleaved_one_f_one_b(r, stages, chunks, microbatches) for r in range(stages)}
    stage_of = {(r, c): c * stages + r for r in range(stages) for c in range(chunks)}
    duration = {}
    for s in range(stages * chunks):
        duration[("F", s)], duration[("B", s)] = forward / chunks, backward / chunks
    return orders, stage_of, duration


@pytest.mark.parametrize("stages, chunks, microbatches", [(2, 1, 1), (4, 1, 3), (4, 1, 8), (2, 2, 4), (4, 2, 8),
                                                          (4, 3, 12), (4, 2, 4)])
def test_every_rank_runs_each_micro_batch_forward_then_backward_once_per_chunk(stages, chunks, microbatches):
    for rank in range(stages):
        ops = interleaved_one_f_one_b(rank, stages, chunks, microbatches)
        want = {Op(kind, m, c) for kind in "FB" for m in range(microbatches) for c in range(chunks)}
        assert len(ops) == len(want) and set(ops) == want
        for m in range(microbatches):
            for c in range(chunks):
                assert ops.index(Op("F", m, c)) < ops.index(Op("B", m, c))


@pytest.mark.parametrize("stages, chunks, microbatches", [(4, 1, 8), (4, 2, 8), (4, 2, 16), (2, 2, 4), (8, 4, 16)])
def test_the_simulated_bubble_is_the_textbook_one(stages, chunks, microbatches):
    """With forward 1 and backward 2 per rank's layers: makespan = 3m + 3(p-1)/v exactly (Megatron-LM's paper),
    so the orders never wait more than the schedule must (and never deadlock)."""
    timeline = simulate(*_pipeline(stages, chunks, microbatches))
    assert timeline.makespan == pytest.approx(3 * microbatches + 3 * (stages - 1) / chunks)


def test_plain_one_f_one_b_is_the_interleaved_order_with_one_chunk():
    assert interleaved_one_f_one_b(1, 4, 1, 6) == one_f_one_b(1, 4, 6)
    assert [op.kind for op in one_f_one_b(0, 2, 3)] == ["F", "F", "B", "F", "B", "B"]


def test_interleaving_refuses_micro_batches_that_are_not_whole_groups_of_stages():
    with pytest.raises(ValueError, match="num_microbatches divisible by pipeline_model_parallel_size=4, got 6"):
        check_interleaving(4, 2, 6)
    check_interleaving(4, 1, 6)


def test_orders_that_wait_on_each_other_are_reported_as_a_deadlock():
    orders = {0: [Op("B", 0), Op("F", 0)], 1: [Op("F", 0), Op("B", 0)]}
    stage_of = {(0, 0): 0, (1, 0): 1}
    duration = {(k, s): 1.0 for k in "FB" for s in range(2)}
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(orders, stage_of, duration)


def test_a_frozen_encoder_pipeline_adds_only_its_forward_before_the_language_model():
    """Encoder stages on their own ranks, forward only, feed the language pipeline: the step is the LM's own
    plus the encoder's forward of one micro-batch through its stages (nothing waits on a backward)."""
    lm_orders, lm_stages, duration = _pipeline(2, 1, 4)
    alone = simulate(lm_orders, lm_stages, duration).makespan
    orders = {10: forward_only(4), 11: forward_only(4)} | {r: ops for r, ops in lm_orders.items()}
    stage_of = {(10, 0): 0, (11, 0): 1} | {(r, c): s + 2 for (r, c), s in lm_stages.items()}
    times = {("F", 0): 0.5, ("F", 1): 0.5} | {(k, s + 2): t for (k, s), t in duration.items()}
    assert simulate(orders, stage_of, times).makespan == pytest.approx(alone + 1.0)


def test_the_bubble_benchmark_replays_the_orders_with_layer_times(tmp_path):
    """benchmarks/pipeline_bubble.py on its placeholder times (the GPU's are measured with --measure): the
    interleaved rows have less bubble than 1F1B, and the frozen encoder adds no more than its own forward."""
    from tests.scripts import load_script

    out = load_script("pipeline_bubble", "pipeline_bubble").main(["--json", str(tmp_path / "bubble.json")])
    rows = {r["row"]: r for r in out["rows"]}
    assert rows["LM PP4 x VPP2 interleaved, 8 micro-batches"]["bubble_reduction"] > 0.3
    frozen = rows["frozen ViT PP2 (forward only) + LM PP4 1F1B, 8 micro-batches"]
    assert frozen["makespan_ms"] <= frozen["lm_alone_plus_encoder_forward_ms"] + 1e-9
