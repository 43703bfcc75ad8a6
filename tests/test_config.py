"""Validation of per-module layouts: every rule of DESIGN §3 with its message."""

from __future__ import annotations

import warnings

import pytest

from mimo.config import LayoutError, MimoParallelismConfig, ModuleParallelismConfig


def cfg(**modules: dict) -> MimoParallelismConfig:
    """A config from {module: fields}."""
    return MimoParallelismConfig.from_dict(modules)


def heterogeneous() -> MimoParallelismConfig:
    """images DP 2 on 0-1, language TP 2 x PP 2 on 2-5, audio DP 2 on 6-7."""
    return cfg(
        images={"data_parallel_size": 2},
        language={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                  "data_parallel_size": 1, "rank_offset": 2},
        audio={"data_parallel_size": 2, "rank_offset": 6},
    )


# -- ModuleParallelismConfig -------------------------------------------------------------------
def test_sizes_and_derived_dp():
    m = ModuleParallelismConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    m.finalize(world_size=16)
    assert m.data_parallel_size == 4
    assert m.total_model_parallel_size == 4
    assert m.total_ranks == 16
    assert m.shape == (2, 4, 1, 2)
    assert m.span == range(0, 16)


def test_dp_not_derivable_when_world_not_divisible():
    m = ModuleParallelismConfig(tensor_model_parallel_size=3, pipeline_model_parallel_size=2)
    with pytest.raises(LayoutError, match=r"world_size 10 is not divisible by TP·CP·PP = 6"):
        m.finalize(world_size=10, name="language")


def test_dp_not_derivable_off_rank_zero():
    c = cfg(images={"data_parallel_size": 2}, language={"rank_offset": 2})
    with pytest.raises(LayoutError, match=r"module 'language': data_parallel_size is None but the module starts "
                                          r"at rank 2.*set data_parallel_size explicitly"):
        c.finalize(4)


def test_dp_derived_for_module_spanning_the_world():
    c = cfg(images={}, language={"tensor_model_parallel_size": 2}).finalize(4)
    assert c.get_parallelism("images").data_parallel_size == 4
    assert c.get_parallelism("language").data_parallel_size == 2
    assert c.deployment == "colocated"


@pytest.mark.parametrize("field", ["tensor_model_parallel_size", "pipeline_model_parallel_size",
                                   "context_parallel_size", "expert_model_parallel_size", "data_parallel_size"])
@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2", "two"])
def test_non_positive_sizes(field, value):
    # caught as the file is read (issue 17: "2" or "two" was a TypeError from the world-size sum)
    with pytest.raises(LayoutError, match=rf"module 'language': {field} must be a positive integer, got"):
        cfg(language={field: value}).finalize(2)


def test_negative_offset():
    with pytest.raises(LayoutError, match=r"module 'language': rank_offset must be an integer >= 0, got -1"):
        cfg(language={"data_parallel_size": 1, "rank_offset": -1}).finalize(2)


# -- MimoParallelismConfig ---------------------------------------------------------------------
def test_missing_language():
    with pytest.raises(LayoutError, match=r"no 'language' module.*modules given: \['images'\]"):
        cfg(images={"data_parallel_size": 2}).finalize(2)


def test_span_past_world_size():
    c = cfg(images={"data_parallel_size": 2},
            language={"tensor_model_parallel_size": 2, "data_parallel_size": 2, "rank_offset": 2})
    with pytest.raises(LayoutError, match=r"module 'language' \(TP2 x DP2 on ranks 2-5\) runs past world_size 4: "
                                          r"it needs ranks up to 5.*world_size >= 6"):
        c.finalize(4)


def test_partial_overlap():
    c = cfg(images={"data_parallel_size": 3},
            language={"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 2})
    with pytest.raises(LayoutError, match=r"modules 'images' \(ranks 0-2\) and 'language' \(ranks 2-3\) partially "
                                          r"overlap; two spans must either coincide"):
        c.finalize(4)


def test_partial_overlap_same_start():
    c = cfg(images={"data_parallel_size": 2}, language={"data_parallel_size": 4})
    with pytest.raises(LayoutError, match=r"'images' \(ranks 0-1\) and 'language' \(ranks 0-3\) partially overlap"):
        c.finalize(4)


def test_gap_between_modules():
    c = cfg(images={"data_parallel_size": 2}, language={"data_parallel_size": 2, "rank_offset": 3})
    with pytest.raises(LayoutError, match=r"rank 2 between modules 'images' \(ranks 0-1\) and 'language' \(ranks "
                                          r"3-4\): no module holds them.*start 'language' at rank 2"):
        c.finalize(5)


def test_unused_trailing_ranks():
    c = cfg(images={"data_parallel_size": 2}, language={"data_parallel_size": 2, "rank_offset": 2})
    with pytest.raises(LayoutError, match=r"ranks 4-5 after the last module 'language': no module holds them; "
                                          r"use world_size 4"):
        c.finalize(6)


def test_leading_ranks_warn_and_become_stub_ranks():
    c = cfg(images={"data_parallel_size": 1, "rank_offset": 1},
            language={"tensor_model_parallel_size": 2, "data_parallel_size": 1, "rank_offset": 2})
    with pytest.warns(UserWarning, match=r"rank 0 before the first module 'images': no module holds them, so "
                                        r"they will be stub ranks"):
        c.finalize(4)
    assert c.stub_ranks(4) == [0]
    assert c.deployment == "heterogeneous"
    assert c.modules_on_rank(0) == []
    assert c.modules_on_rank(3) == ["language"]


def test_finalize_twice_warns_once():
    c = cfg(language={"data_parallel_size": 1, "rank_offset": 2})
    with pytest.warns(UserWarning):
        c.finalize(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.finalize(3)


def test_edge_dp_sizes_must_divide():
    c = cfg(images={"data_parallel_size": 2},
            language={"data_parallel_size": 3, "rank_offset": 2})
    with pytest.raises(LayoutError, match=r"edge images -> language: data_parallel_size 2 \(images\) and 3 "
                                          r"\(language\) do not divide one another"):
        c.finalize(5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("expert_model_parallel_size", 2, r"module 'language': expert_model_parallel_size=2 is not supported yet"),
    ],
)
def test_unsupported_dims(field, value, message):
    c = cfg(language={field: value})
    with pytest.raises(LayoutError, match=message):
        c.finalize(2)


def test_context_parallel_is_the_language_modules():
    """CP splits the language model's sequence; an encoder has it only in a homogeneous layout (its CP ranks share a
    replica's images, split by patch count: a replica of one sample is fine), elsewhere it is one line."""
    c = cfg(images={"data_parallel_size": 4}, language={"context_parallel_size": 2, "data_parallel_size": 2})
    assert c.finalize(4).deployment == "colocated"
    assert c.get_parallelism("language").describe() == "TP1 x CP2 x DP2 on ranks 0-3"
    homogeneous = cfg(images={"context_parallel_size": 2}, language={"context_parallel_size": 2}).finalize(4)
    assert homogeneous.deployment == "homogeneous"
    assert homogeneous.validate_batch(8, 2) == 4
    assert homogeneous.validate_batch(4, 2) == 2
    with pytest.raises(LayoutError, match=r"^module 'images': context_parallel_size=2 is supported for a modality "
                                          r"module only in a homogeneous layout \(the same layout as 'language'\)"):
        cfg(images={"context_parallel_size": 2, "data_parallel_size": 1},
            language={"data_parallel_size": 2}).finalize(2)


def test_a_pipelined_encoder_on_the_language_ranks_is_colocated():
    c = cfg(images={"pipeline_model_parallel_size": 2}, language={"pipeline_model_parallel_size": 2}).finalize(2)
    assert c.deployment == "colocated"  # the same layout, but the tower's last stage is not the language's first


@pytest.mark.parametrize(("fields", "message"), [
    ({"sequence_parallel": True}, r"module 'language': sequence_parallel shards the sequence over the "
                                  r"tensor-parallel group, but tensor_model_parallel_size is 1; set sequence_parallel "
                                  r"false or tensor_model_parallel_size > 1"),
    ({"tensor_model_parallel_size": 2, "sequence_parallel": "yes"},
     r"module 'language': sequence_parallel must be true or false, got 'yes'"),
])
def test_sequence_parallel_errors(fields, message):
    with pytest.raises(LayoutError, match=message):
        cfg(language=fields)


def test_sequence_parallel_is_described_and_keeps_the_deployment():
    """SP changes no module's output (its blocks gather the sequence back), so TP2+SP next to TP2 is homogeneous."""
    c = cfg(images={"tensor_model_parallel_size": 2},
            language={"tensor_model_parallel_size": 2, "sequence_parallel": True}).finalize(2)
    assert c.get_parallelism("language").describe() == "TP2+SP x DP1 on ranks 0-1"
    assert c.deployment == "homogeneous"
    assert MimoParallelismConfig.from_dict(c.to_dict()).get_parallelism("language").sequence_parallel


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(LayoutError, match=r"module 'images': unknown key\(s\) \['tp'\]; allowed keys are "
                                          r"\['tensor_model_parallel_size'"):
        cfg(images={"tp": 2}, language={})


def test_bad_shapes_of_input():
    with pytest.raises(LayoutError, match="parallelism must be a mapping"):
        MimoParallelismConfig.from_dict([1, 2])
    with pytest.raises(LayoutError, match=r"module 'language': expected a mapping of layout fields, got 3"):
        MimoParallelismConfig.from_dict({"language": 3})


def test_topology_names_unknown_module():
    c = MimoParallelismConfig.from_dict({"language": {}})
    c.topology = {"video": ["language"]}
    with pytest.raises(LayoutError, match=r"edge video -> language: no module 'video'"):
        c.finalize(1)


def test_global_batch_divisibility():
    c = heterogeneous().finalize(8)
    assert c.validate_batch(8, 2) == 4
    with pytest.raises(LayoutError, match=r"module 'images': micro-batch size 3 .* not divisible by its "
                                          r"data_parallel_size 2; use a global batch that is a multiple of 2"):
        c.validate_batch(3, 1)
    with pytest.raises(LayoutError, match="global_batch_size 6 is not divisible by num_microbatches 4"):
        c.validate_batch(6, 4)


# -- deployment, queries, dict form --------------------------------------------------------------
def test_deployments():
    homo = cfg(images={"tensor_model_parallel_size": 2}, language={"tensor_model_parallel_size": 2}).finalize(4)
    assert homo.deployment == "homogeneous"
    colo = cfg(images={"data_parallel_size": 4},
               language={"tensor_model_parallel_size": 2, "data_parallel_size": 2}).finalize(4)
    assert colo.deployment == "colocated"
    het = heterogeneous().finalize(8)
    assert het.deployment == "heterogeneous"
    assert het.total_world_size == 8
    assert het.stub_ranks(8) == []
    assert het.edges == [("images", "language"), ("audio", "language")]


def test_three_modules_two_spans_is_heterogeneous():
    c = cfg(images={"data_parallel_size": 2}, audio={"data_parallel_size": 2},
            language={"data_parallel_size": 2, "rank_offset": 2}).finalize(4)
    assert c.deployment == "heterogeneous"


def test_dict_round_trip_and_module_order():
    c = heterogeneous()
    again = MimoParallelismConfig.from_dict(c.to_dict())
    assert again == c
    assert again.module_names == ["images", "language", "audio"]
    assert again.modality_names == ["images", "audio"]


def test_get_parallelism_unknown_module():
    with pytest.raises(KeyError, match=r"no module 'video'; modules are \['images', 'language', 'audio'\]"):
        heterogeneous().get_parallelism("video")


def test_world_size_before_finalize():
    with pytest.raises(LayoutError, match=r"not finalized: call finalize\(world_size\) first"):
        _ = heterogeneous().world_size
