"""A Hugging Face LLaVA loads onto layouts of the parity matrix, each rank reading only its slices, and trains
from there with the single-process numbers (float64, relative 1e-8).

Loading: every parameter a rank hosts equals, bit for bit, the single-process load (whose logits equal
transformers', tests/hf/test_load.py), and the elements a rank reads from the files are exactly the elements
of its shards. Training: 2 steps of AdamW from the loaded model give the single-process losses and parameters.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mimo.config import MimoParallelismConfig
from mimo.data import ModalitySpec, SyntheticDataset
from mimo.ddp_shards import local_tensor
from mimo.distributed import DistributedConfig
from mimo.families.llava import LlavaMimoProvider
from mimo.families.llava.hf_load import open_llava
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.step import MimoTrainer
from tests.hf import tiny_hf
from tests.training.test_parity import CLIP, OPTIM, full_params, train_one_process  # the reference's settings

STEPS, GLOBAL_BATCH, MICRO = 2, 4, 2


def hf_provider(directory, layout: dict | None) -> LlavaMimoProvider:
    config = None if layout is None else MimoParallelismConfig.from_dict(layout)
    return LlavaMimoProvider(**open_llava(directory).provider_kwargs(), mimo_parallelism_config=config,
                             params_dtype=torch.float64, seed=3)


def batches() -> list:
    data = SyntheticDataset(32, {"images": ModalitySpec.image(tiny_hf.IMAGE_TOKEN, 16)}, vocab_size=tiny_hf.IMAGE_TOKEN,
                            items_per_sample=(0, 1, 2), seed=5, dtype=torch.float64)
    return [data.batch(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)) for s in range(STEPS)]


def reference(directory) -> tuple[dict, list, dict]:
    """Single process: the loaded parameters, then the losses and parameters after STEPS steps."""
    model = hf_provider(directory, None).provide()
    loaded = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, _ = train_one_process(model, batches(), MICRO)
    return loaded, losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def load_and_train(rank: int, world_size: int, directory: str, layout: dict) -> dict:
    """Load this rank's part, note what it read, train STEPS steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = hf_provider(directory, layout)
        model = prov.provide_distributed_model(DistributedConfig())
    loaded = full_params(model)
    hosted = sum(local_tensor(p).numel() for p in model.parameters())
    reads = prov.initial_weights.reads
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64)
    losses = [trainer.train_step(batch).loss for batch in batches()]
    return {"loaded": loaded, "hosted": hosted, "reads": reads, "losses": losses,
            "params": full_params(model)}  # a stub rank's empty model holds none


LAYOUTS = {
    "language-tp2": (2, {"images": {"tensor_model_parallel_size": 2}, "language": {"tensor_model_parallel_size": 2}}),
    "language-tp2-sp": (2, {"images": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
                            "language": {"tensor_model_parallel_size": 2, "sequence_parallel": True}}),
    "colocated-pp2": (2, {"images": {"data_parallel_size": 2},
                          "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1}}),
    "heterogeneous-tp2pp2": (5, {"images": {"data_parallel_size": 1},
                                 "language": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                              "data_parallel_size": 1, "rank_offset": 1}}),
}
MODELS = {"clip-llama": {}, "siglip-qwen2-tied": {"vision": "siglip", "text": "qwen2", "vision_feature_layer": -1,
                                                 "vision_feature_select_strategy": "full",
                                                 "text_kw": {"tie_word_embeddings": True},
                                                 "tie_word_embeddings": True}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, kw in MODELS.items():
        directory = tmp_path_factory.mktemp(name)
        tiny_hf.save_llava(directory, **kw)
        out[name] = (directory, reference(directory))
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_load_onto_layout_and_train(saved, model, layout):
    directory, (ref_loaded, ref_losses, ref_params) = saved[model]
    world, spec = LAYOUTS[layout]
    results = run_distributed(load_and_train, world, str(directory), spec, timeout_s=240)
    seen = set()
    for rank, res in enumerate(results):
        for n, p in res["loaded"].items():
            want = ref_loaded[n] if n in ref_loaded else ref_loaded[n.replace("lm_head", "embed_tokens")]
            assert torch.equal(p, want), f"rank {rank}: loaded {n} differs from the single-process load"
            seen.add(n if n in ref_loaded else n.replace("lm_head", "embed_tokens"))
        read = sum(torch.Size(shape).numel() for _, shape in res["reads"])
        assert read == res["hosted"], f"rank {rank} read {read} elements for {res['hosted']} it hosts"
        for s, (got, want) in enumerate(zip(res["losses"], ref_losses, strict=True)):
            assert abs(got - want) <= 1e-8 * abs(want), f"rank {rank} step {s}: loss {got!r} != {want!r}"
        params = {n if n in ref_params else n.replace("lm_head", "embed_tokens"): p  # tied: the embedding's
                  for n, p in res["params"].items()}
        assert_matches_reference(params, ref_params, f"rank {rank}: trained parameter")
    assert seen == set(ref_loaded), f"parameters no rank loaded: {sorted(set(ref_loaded) - seen)}"
