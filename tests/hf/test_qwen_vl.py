"""Qwen2.5-VL and Qwen3-VL directories load into mimo's one-process model and compute transformers' logits.

Tiny random models of both families are written with `save_pretrained` (odd shapes: GQA, an explicit head_dim,
three images of different sizes in one packed call, a window that divides no grid, DeepStack from layers listed
out of order); mimo reads the directory (config strictly, weights by name) and its logits, with M-RoPE positions
from `get_rope_index`, equal transformers' to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mimo.families.qwen_vl import QwenVLMimoProvider, open_qwen_vl
from mimo.hf.config import HFConfigError
from mimo.models import ModalityBatch
from mimo.models.mrope import get_rope_index

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, START, END = 90, 91, 92, 93
GRIDS = torch.tensor([[1, 8, 6], [1, 4, 4], [1, 6, 10]])  # patches (t, h, w): 12, 4 and 15 merged tokens
TEXT = {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "intermediate_size": 40, "vocab_size": 96, "initializer_range": 0.3}


def _qwen25() -> transformers.PreTrainedModel:
    vision = {"depth": 3, "hidden_size": 16, "num_heads": 2, "intermediate_size": 24, "out_hidden_size": 48,
              "patch_size": 2, "window_size": 12, "fullatt_block_indexes": [1], "initializer_range": 0.3}
    text = {**TEXT, "head_dim": 12,  # Qwen2.5-VL's attention takes hidden / heads only
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2],
                                "type": "mrope"}}
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                           video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def _qwen3() -> transformers.PreTrainedModel:
    vision = {"depth": 3, "hidden_size": 16, "num_heads": 2, "intermediate_size": 24, "out_hidden_size": 48,
              "patch_size": 2, "num_position_embeddings": 16, "deepstack_visual_indexes": [2, 0],
              "initializer_range": 0.3}
    text = {**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 1, 1],
                                        "mrope_interleaved": True}}
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                        video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
                                        tie_word_embeddings=True)
    return transformers.Qwen3VLForConditionalGeneration(config)


def _inputs(patch_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: images 1 and 2 in the first (text around them), image 3 in the second; packed patches."""
    torch.manual_seed(0)
    tokens = (GRIDS.prod(1) // 4).tolist()

    def image(n: int) -> list[int]:
        return [START, *[IMAGE] * n, END]

    first = [1, 2, *image(tokens[0]), 3, *image(tokens[1]), 4, 5]
    second = [6, *image(tokens[2]), 7, 8, 9]
    width = max(len(first), len(second))
    ids = torch.tensor([first + [0] * (width - len(first)), second + [0] * (width - len(second))])
    pixels = torch.randn(int(GRIDS.prod(1).sum()), patch_dim)
    return ids, pixels, torch.tensor([[1] * len(first) + [0] * (width - len(first)),
                                      [1] * len(second) + [0] * (width - len(second))])


def _loaded(build, directory: Path) -> tuple:
    """A reference model of `build` saved to `directory`, the directory opened by mimo, and mimo's one-process
    model filled from it (both in eval mode)."""
    reference = build().eval()
    reference.save_pretrained(directory)
    opened = open_qwen_vl(directory)
    model = QwenVLMimoProvider(opened.spec, initial_weights=opened.weights()).provide().eval()
    return reference, opened, model


@pytest.mark.parametrize("build", [_qwen25, _qwen3], ids=["qwen2.5-vl", "qwen3-vl"])
def test_logits_equal_transformers(tmp_path: Path, build) -> None:
    reference, directory, model = _loaded(build, tmp_path)
    ids, pixels, mask = _inputs(directory.spec.vision.patch_dim)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=GRIDS,
                         mm_token_type_ids=(ids == IMAGE).int()).logits
        images = ModalityBatch(pixels, torch.tensor([2, 1]), GRIDS)
        positions, _ = get_rope_index(ids, GRIDS, directory.spec.vision.spatial_merge_size, IMAGE, mask)
        inputs = model.language_inputs(ids, model.encode({"images": images}), model.tokens_per_sample({"images":
                                                                                                           images}))
        decoder = model.language_model
        got = decoder.logits(decoder(**inputs, position_ids=positions))
    keep = mask.bool()  # padded positions: transformers masks their keys; causal attention keeps them out of ours
    scale = want[keep].abs().max()  # float32 rounding relative to the logits' size (the helpers' 1e-5 bound)
    assert (got[keep] - want[keep]).abs().max() <= 1e-5 * scale, ((got[keep] - want[keep]).abs().max(), scale)
    assert directory.spec.language.deepstack_layers == ((0, 1) if build is _qwen3 else ())


@pytest.mark.parametrize(("key", "value", "message"), [
    ("use_sliding_window", True, "use_sliding_window=True is not supported"),
    ("head_dim", 8, "head_dim=8 is not supported by mimo; it implements head_dim hidden_size / num_attention_heads"),
])
def test_an_unimplemented_value_is_refused_naming_key_and_value(tmp_path: Path, key, value, message) -> None:
    reference = _qwen25()
    setattr(reference.config.text_config, key, value)
    reference.save_pretrained(tmp_path)
    with pytest.raises(HFConfigError, match=message):
        open_qwen_vl(tmp_path)


@pytest.mark.parametrize("build", [_qwen25, _qwen3], ids=["qwen2.5-vl", "qwen3-vl"])
def test_export_round_trip_is_bit_exact(tmp_path: Path, build) -> None:
    """HF → mimo → HF: the same tensors under the same names, bit for bit, the same config, and transformers loads
    it (Qwen3-VL's tied head is left out as `save_pretrained` leaves it out)."""
    from safetensors.torch import load_file

    from mimo.data.section import DataSection
    from mimo.families.qwen_vl import QwenVLSection
    from mimo.families.qwen_vl.export import export

    origin = tmp_path / "origin"
    build().save_pretrained(origin)
    directory = open_qwen_vl(origin)
    provider = QwenVLMimoProvider(directory.spec, initial_weights=directory.weights())
    out, architecture = export(provider.provide(), QwenVLSection(hf=str(origin)), DataSection(), provider,
                               tmp_path / "out")
    want, got = load_file(origin / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[name], want[name]) and got[name].dtype == want[name].dtype for name in want)
    assert json.loads((out / "config.json").read_text()) == json.loads((origin / "config.json").read_text())
    loaded = getattr(transformers, architecture).from_pretrained(out)
    assert all(torch.equal(p, want[n]) for n, p in loaded.state_dict().items() if n in want)


@pytest.mark.parametrize("build", [_qwen25, _qwen3], ids=["qwen2.5-vl", "qwen3-vl"])
def test_greedy_generation_equals_transformers_token_for_token(tmp_path: Path, build) -> None:
    """mimo's greedy decoder with M-RoPE positions (prompt by `get_rope_index`, each new token the next position
    on every axis) generates transformers' `generate(do_sample=False)` ids, images of three sizes in the prompt."""
    from mimo.models.generation import greedy_decode

    reference, directory, model = _loaded(build, tmp_path)
    ids, pixels, _ = _inputs(directory.spec.vision.patch_dim)
    ids = ids[:1, :int((ids[0] != 0).sum())]  # the first row, unpadded: its two images
    grids, first = GRIDS[:2], int(GRIDS[:2].prod(1).sum())
    with torch.no_grad():
        want = reference.generate(input_ids=ids, pixel_values=pixels[:first], image_grid_thw=grids,
                                  mm_token_type_ids=(ids == IMAGE).int(), max_new_tokens=12, do_sample=False,
                                  min_new_tokens=12)[:, ids.shape[1]:]
    merge = directory.spec.vision.spatial_merge_size
    got = greedy_decode(model, ids, {"images": ModalityBatch(pixels[:first], torch.tensor([2]), grids)}, 12,
                        positions=lambda prompt: get_rope_index(prompt, grids, merge, IMAGE)[0])
    assert got.tolist() == want.tolist()
