"""The run's precision policy: one place decides parameter dtype, compute dtype and loss scaling."""

from __future__ import annotations

import pytest
import torch

from mimo.precision import PrecisionError, PrecisionPolicy
from mimo.training.run_config import parse_run_config


@pytest.mark.parametrize(("name", "param", "compute", "scaling"), [
    ("float32", torch.float32, torch.float32, False),
    ("float64", torch.float64, torch.float64, False),
    ("bfloat16", torch.float32, torch.bfloat16, False),
    ("float16", torch.float32, torch.float16, True),
])
def test_policy_of_each_dtype(name, param, compute, scaling):
    policy = PrecisionPolicy.from_name(name)
    assert (policy.param_dtype, policy.compute_dtype, policy.loss_scaling) == (param, compute, scaling)
    assert policy.mixed == (param != compute)
    config = parse_run_config({"parallelism": {"images": {}, "language": {}}, "train": {"dtype": name},
                               "distributed": {"language": {"data_parallel": "fsdp"}}})
    assert config.precision is config.precision and config.precision == policy
    wrap = config.distributed_config  # mixed precision reaches every module's wrapping, else nothing
    dtypes = {wrap.default.compute_dtype, wrap.for_module("language").compute_dtype}
    assert dtypes == {compute if policy.mixed else None}
    assert all(d is None or isinstance(d, torch.dtype) for d in dtypes)  # a dtype once parsed, never a name


def test_unknown_dtype_names_the_allowed_ones():
    with pytest.raises(PrecisionError, match=r"unknown dtype 'fp8'; choose one of \['float32', 'bfloat16'"):
        PrecisionPolicy.from_name("fp8")
