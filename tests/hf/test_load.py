"""Hugging Face checkpoints load into mimo with transformers' numbers (float32, relative 1e-5).

Each case builds a tiny random model with transformers, saves it, loads the directory into mimo (one process
here; layouts in test_load_layouts.py) and compares logits on a batch with one image per sample.
"""

from __future__ import annotations

import pytest
import torch

from mimo.families.llava import LlavaMimoProvider
from mimo.families.llava.hf_load import open_llava, open_pair
from mimo.hf.load import HFLoadError
from mimo.models import ModalityBatch
from tests.hf import tiny_hf

RTOL = 1e-5

LLAVA_CASES = {
    "clip-llama-gqa": {},
    "clip-llama-rope-llama3-theta": {"text_kw": {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}},
    "clip-llama-attention-bias-head-dim-eps": {"text_kw": {"attention_bias": True, "head_dim": 32,
                                                           "rms_norm_eps": 1e-5}},
    "clip-mistral": {"text": "mistral", "text_kw": {"sliding_window": 128, "head_dim": 16}},
    "clip-qwen2-tied": {"text": "qwen2", "text_kw": {"tie_word_embeddings": True}, "tie_word_embeddings": True},
    "clip-layer-3-full-silu-projector": {"vision_feature_layer": -3, "vision_feature_select_strategy": "full",
                                         "projector_hidden_act": "silu", "multimodal_projector_bias": False},
    "clip-layer-minus-1-gelu-tower": {"vision_feature_layer": -1, "vision_kw": {"hidden_act": "gelu"}},
    "siglip-qwen2-full": {"vision": "siglip", "text": "qwen2", "vision_feature_layer": -1,
                          "vision_feature_select_strategy": "full"},
    "siglip-llama-default": {"vision": "siglip"},
}


def mimo_logits(model, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The logits of a whole single-process MimoModel for one image per sample."""
    images = {"images": ModalityBatch(pixels, torch.ones(ids.shape[0], dtype=torch.long))}
    inputs = model.language_inputs(ids, model.encode(images), model.tokens_per_sample(images))
    return model.language_model.logits(model.language_model(**inputs))


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= rtol, f"largest difference {rel:.1e} relative to the largest logit (limit {rtol:.0e})"


def provide(hf_model, **kw):
    return LlavaMimoProvider(**hf_model.provider_kwargs(), **kw).provide()


@pytest.mark.parametrize("case", sorted(LLAVA_CASES))
def test_llava_logits_equal_transformers(tmp_path, case):
    reference = tiny_hf.save_llava(tmp_path, **LLAVA_CASES[case])
    model = provide(open_llava(tmp_path))
    tokens = model.modality_submodules["images"].tokens_per_item
    ids, pixels = tiny_hf.inputs(tokens)
    with torch.no_grad():
        want = reference(input_ids=ids, pixel_values=pixels).logits
        assert_close(mimo_logits(model, ids, pixels), want)


def test_pair_loads_tower_and_language_model_with_a_seeded_projector(tmp_path):
    vision = tiny_hf.save_vision(tmp_path / "clip")
    language = tiny_hf.save_language(tmp_path / "llama", "qwen2", tie_word_embeddings=True)
    hf = open_pair(tmp_path / "clip", tmp_path / "llama")
    model = provide(hf, seed=7)
    pixels = tiny_hf.inputs(16)[1]
    with torch.no_grad():
        want = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert_close(model.modality_submodules["images"].encoder(pixels), want)
        ids = torch.randint(0, tiny_hf.VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
        hidden = model.language_model(input_ids=ids)
        assert_close(model.language_model.logits(hidden), language(input_ids=ids).logits)
    fresh = LlavaMimoProvider(vision_config=hf.spec.vision, language_config=hf.spec.language, seed=7).provide()
    for name, p in model.modality_submodules["images"].projection.named_parameters():  # seeded, not read
        torch.testing.assert_close(p, dict(fresh.modality_submodules["images"].projection.named_parameters())[name],
                                   rtol=0, atol=0)
    assert hf.spec.image_token_id == tiny_hf.VOCAB


def test_a_rank_reads_every_parameter_once_and_nothing_else(tmp_path):
    tiny_hf.save_llava(tmp_path)
    hf = open_llava(tmp_path)
    kwargs = hf.provider_kwargs()
    model = LlavaMimoProvider(**kwargs).provide()
    reads = kwargs["initial_weights"].reads
    assert sum(torch.Size(s).numel() for _, s in reads) == sum(p.numel() for p in model.parameters())
    assert len({k for k, _ in reads}) == len(reads)
    # the tower's unused last layer and post-LayerNorm are never read (LLaVA reads layer -2)
    assert not [k for k, _ in reads if "layers.2." in k or "post_layernorm" in k]


def test_a_missing_tensor_is_named(tmp_path):
    model = tiny_hf.llava()
    state = {k: v for k, v in model.state_dict().items() if "linear_2.bias" not in k}
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(HFLoadError, match=r"no tensor for modality_submodules\.images\.projection\.fc2\.bias"):
        provide(open_llava(tmp_path))


def test_a_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_hf.save_llava(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["multi_modal_projector.linear_1.bias"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFLoadError, match=r"multi_modal_projector\.linear_1\.bias has shape \[3\]"):
        provide(open_llava(tmp_path))


def test_no_safetensors_is_an_error(tmp_path):
    tiny_hf.llava().config.save_pretrained(tmp_path)
    with pytest.raises(HFLoadError, match="no safetensors weights"):
        open_llava(tmp_path)


def test_a_placed_provider_keeps_its_own_read_log_and_a_plan_pickles_after_reads(tmp_path):
    """`MimoModelProvider.placed` (a rank's, the evaluation's) shares the directories but not the read log, and a
    weights source that has opened its files still pickles (a spawned worker opens its own)."""
    import copy
    import pickle

    tiny_hf.save_llava(tmp_path / "llava")
    provider = LlavaMimoProvider(**open_llava(tmp_path / "llava").provider_kwargs())
    first, second = provider.placed(None, "cpu"), provider.placed(None, "cpu")
    first.provide()
    assert first.initial_weights.reads and second.initial_weights.reads == []
    assert second.initial_weights.rules is first.initial_weights.rules
    weights = pickle.loads(pickle.dumps(first.initial_weights))  # its SafetensorsDir holds open files now
    assert weights.rules[0].checkpoint._open == {} and copy.copy(weights).reads == []
