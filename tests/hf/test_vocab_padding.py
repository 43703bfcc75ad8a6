"""A Hugging Face LLaVA whose vocabulary the language model's TP size does not divide (LLaVA-1.5's 32001 after an
added pad token; here 101 ids) is padded (`model.make_vocab_size_divisible_by`), not refused: at TP2 it trains
with one process's numbers (float64, 1e-8), the padded rows stay zero, generation never emits a padded id, and the
export holds the directory's own tensors, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from mimo.config import MimoParallelismConfig
from mimo.distributed import DistributedConfig
from mimo.families.family import BuildSettings
from mimo.families.llava.build import build_provider, open_model
from mimo.families.llava.export import Origin, export_llava
from mimo.families.llava.hf_config import LlavaSpec
from mimo.families.llava.section import LlavaSection
from mimo.models.generation import greedy_decode
from mimo.models.mimo_model import ModalityBatch
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.plan import plan_run
from mimo.training.run_config import parse_run_config
from mimo.training.step import MimoTrainer
from tests.hf import tiny_hf
from tests.hf.test_load_layouts import GLOBAL_BATCH, MICRO, STEPS
from tests.training.test_parity import CLIP, OPTIM, full_params, train_one_process

VOCAB, IMAGE = 101, 100  # the image token is the vocabulary's last id, as LLaVA-1.5's <image> 32000 of 32064
TP2 = {"images": {"tensor_model_parallel_size": 2}, "language": {"tensor_model_parallel_size": 2}}
PADDED = 128
EMBED, HEAD = "language_model.embed_tokens.weight", "language_model.lm_head.weight"


def save_llava(directory) -> None:
    """A tiny random LLaVA with a 101-id vocabulary."""
    transformers = tiny_hf.transformers
    config = transformers.LlavaConfig(vision_config=tiny_hf.vision_config("clip"),
                                      text_config=tiny_hf.text_config("llama", vocab_size=VOCAB),
                                      image_token_index=IMAGE)
    torch.manual_seed(0)
    tiny_hf.perturb(transformers.LlavaForConditionalGeneration(config)).save_pretrained(directory)


def provider(directory, layout: dict | None, **section: object):
    """The LLaVA family's provider of the directory's model for `layout` (None: one process, nothing padded)."""
    section = LlavaSection(hf=str(directory), **section)
    config = None if layout is None else MimoParallelismConfig.from_dict(layout)
    return build_provider(section, open_model(section), BuildSettings(config, torch.float64, seed=3))


def batches() -> list:
    from mimo.data import ModalitySpec, SyntheticDataset

    data = SyntheticDataset(32, {"images": ModalitySpec.image(IMAGE, 16)}, vocab_size=IMAGE, items_per_sample=(0, 1),
                            seed=5, dtype=torch.float64)
    return [data.batch(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)) for s in range(STEPS)]


def train_tp2(rank: int, world_size: int, directory: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = provider(directory, TP2)
        model = prov.provide_distributed_model(DistributedConfig())
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64)
    losses = [trainer.train_step(batch).loss for batch in batches()]
    return {"losses": losses, "params": full_params(model)}


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava101")
    save_llava(out)
    return out


def test_tp2_pads_the_vocabulary_and_trains_as_one_process(directory):
    single = provider(directory, None)
    assert single.language_config.padded_vocab_size is None  # one process: the directory's shapes
    assert provider(directory, TP2).language_config.padded_vocab_size == PADDED
    # set, make_vocab_size_divisible_by pads on every layout (a run moves between TP 2 and TP 1)
    assert provider(directory, None, make_vocab_size_divisible_by=128).language_config.padded_vocab_size == PADDED
    assert provider(directory, TP2, make_vocab_size_divisible_by=8).language_config.padded_vocab_size == 104
    model = single.provide()
    ref_losses, _ = train_one_process(model, batches(), MICRO)
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for rank, res in enumerate(run_distributed(train_tp2, 2, str(directory), timeout_s=240)):
        for s, (got, want) in enumerate(zip(res["losses"], ref_losses, strict=True)):
            assert abs(got - want) <= 1e-8 * abs(want), f"rank {rank} step {s}: loss {got!r} != {want!r}"
        params = res["params"]
        for name in (EMBED, HEAD):
            assert params[name].shape[0] == PADDED and not params[name][VOCAB:].any(), f"{name}'s padded rows"
            params[name] = params[name][:VOCAB]
        assert_matches_reference(params, ref_params, f"rank {rank}: trained parameter")


def test_validate_accepts_it_and_the_export_is_the_directory(directory, tmp_path):
    """`mimo validate` took "vocabulary entries 101 ... not divisible" for an answer; the model built for TP2 (as
    export-hf and generate build a checkpoint's, whole in one process) writes back the directory's tensors."""
    config = parse_run_config({"model": {"hf": str(directory)}, "parallelism": TP2, "data": {"name": "synthetic"},
                               "train": {"global_batch_size": 2}})
    plan_run(config, 2)  # refused before: the vocabulary did not split over TP2
    prov = provider(directory, TP2).placed(None, None)
    model = prov.provide()
    assert model.language_model.embed_tokens.weight.shape[0] == PADDED
    spec = LlavaSpec(prov.vision_config, prov.language_config, prov.image_token_id, prov.projector_activation,
                     prov.projector_bias)
    out = export_llava(model, spec, tmp_path / "out", Origin(llava=directory))
    want, got = load_file(directory / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_generation_never_emits_a_padded_id(directory):
    model = provider(directory, TP2).placed(None, None).provide()
    with torch.no_grad():  # padded rows that would win every argmax if their logits were not cut off
        model.language_model.lm_head.weight[VOCAB:] = 1e3
    ids, pixels = tiny_hf.inputs(16, batch=1)
    ids = torch.where(ids == tiny_hf.IMAGE_TOKEN, IMAGE, ids % IMAGE)
    hidden = model.language_model.embed_tokens.weight.new_ones(1, 1, 64)
    assert model.language_model.logits(hidden).shape[-1] == VOCAB
    images = ModalityBatch(pixels.double(), torch.tensor([1]))
    new = greedy_decode(model, ids, {"images": images}, max_new_tokens=4)
    assert new.shape == (1, 4) and int(new.max()) < VOCAB
