"""`mimo export-hf CHECKPOINT OUT_DIR`: transformers loads what it writes, from a checkpoint of any layout.

HF → mimo (train with lr 0) → HF is bit-exact, config included; a trained checkpoint (heterogeneous TP2),
a tower + language model pair and a preset export to directories whose logits in transformers are mimo's.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from mimo.cli import _checkpoint_model, main
from tests.hf import tiny_hf
from tests.hf.runs import HETEROGENEOUS_TP2, ONE_RANK, train
from tests.hf.test_load import assert_close, mimo_logits

transformers = tiny_hf.transformers


def export(checkpoint, out) -> None:
    assert main(["export-hf", str(checkpoint), str(out)]) == 0


def tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def assert_transformers_matches(out, checkpoint, vocab: int | None = None) -> None:
    """transformers loads `out` with nothing missing or unexpected, and its logits are mimo's."""
    reference, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model, plan = _checkpoint_model(checkpoint)
    provider = plan.provider
    ids, pixels = tiny_hf.inputs(provider.vision_config.tokens_per_image)
    ids = torch.where(ids == tiny_hf.IMAGE_TOKEN, provider.image_token_id, ids % provider.language_config.vocab_size)
    with torch.no_grad():
        want = reference.eval()(input_ids=ids, pixel_values=pixels).logits
        got = mimo_logits(model, ids, pixels)
    assert_close(got, want[..., :got.shape[-1]])
    assert vocab is None or want.shape[-1] == vocab


@pytest.fixture(scope="module")
def preset_checkpoint(tmp_path_factory):
    """A trained (lr 0.01) one-rank checkpoint of the tiny preset."""
    return train(tmp_path_factory.mktemp("preset"), {"preset": "tiny"}, ONE_RANK, lr=0.01)


def assert_round_trip(source, checkpoint, out) -> None:
    """Exported weights and config equal the source's bit for bit; the tokenizer and chat template carry over."""
    export(checkpoint, out)
    before, after = tensors(source), tensors(out)
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert json.loads((source / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    carried = [name for name in ("tokenizer.json", "chat_template.jinja") if (source / name).exists()]
    assert "tokenizer.json" in carried
    for name in carried:
        assert (out / name).read_text() == (source / name).read_text()


def test_round_trip_is_bit_exact(tmp_path, unchanged_llava):
    source, checkpoint = unchanged_llava
    assert_round_trip(source, checkpoint, tmp_path / "out")


def test_round_trip_is_bit_exact_tied_siglip_qwen2(tmp_path):
    source = tmp_path / "source"
    tiny_hf.save_llava(source, vision="siglip", text="qwen2", vision_feature_select_strategy="full",
                       text_kw={"tie_word_embeddings": True}, tie_word_embeddings=True)
    (source / "tokenizer.json").write_text('{"stand-in": true}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    assert_round_trip(source, train(tmp_path, {"hf": str(source)}, ONE_RANK, lr=0.0), tmp_path / "out")


def test_a_trained_heterogeneous_checkpoint_exports(tmp_path):
    tiny_hf.save_llava(tmp_path / "source")
    checkpoint = train(tmp_path, {"hf": str(tmp_path / "source")}, HETEROGENEOUS_TP2, lr=0.01)
    export(checkpoint, tmp_path / "out")
    assert_transformers_matches(tmp_path / "out", checkpoint)
    changed = tensors(tmp_path / "out")["multi_modal_projector.linear_1.weight"]
    assert not torch.equal(changed, tensors(tmp_path / "source")["multi_modal_projector.linear_1.weight"])


def test_a_tower_and_language_model_pair_exports(tmp_path):
    tiny_hf.save_vision(tmp_path / "clip")
    tiny_hf.save_language(tmp_path / "llama", "llama")
    checkpoint = train(tmp_path, {"vision_hf": str(tmp_path / "clip"), "language_hf": str(tmp_path / "llama")},
                       ONE_RANK, lr=0.01)
    export(checkpoint, tmp_path / "out")
    assert_transformers_matches(tmp_path / "out", checkpoint, vocab=tiny_hf.VOCAB + 1)  # the image id added


def test_a_preset_exports(tmp_path, preset_checkpoint):
    export(preset_checkpoint, tmp_path / "out")
    assert_transformers_matches(tmp_path / "out", preset_checkpoint)
    assert json.loads((tmp_path / "out/config.json").read_text())["vision_config"]["num_hidden_layers"] == 2


def test_a_large_model_is_written_in_shards_with_an_index(tmp_path):
    from mimo.families.llava import LlavaMimoProvider
    from mimo.families.llava.export import export_llava
    from mimo.families.llava.hf_config import LlavaSpec

    provider = LlavaMimoProvider.preset("tiny", image_token_id=255)
    model = provider.provide()
    spec = LlavaSpec(provider.vision_config, provider.language_config, 255)
    export_llava(model, spec, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, pixels = tiny_hf.inputs(16)
    ids = torch.where(ids == tiny_hf.IMAGE_TOKEN, 255, ids % 255)
    with torch.no_grad():
        assert_close(mimo_logits(model, ids, pixels), reference(input_ids=ids, pixel_values=pixels).logits)


def test_bad_inputs_are_one_line(tmp_path, capsys, preset_checkpoint):
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    checkpoint = preset_checkpoint
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    capsys.readouterr()
    assert main(["export-hf", str(checkpoint), str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_an_existing_file_as_the_output_is_one_line_before_any_work(tmp_path, capsys):
    """Issue 27: a file where the export goes was a NotADirectoryError traceback (after building the model)."""
    (tmp_path / "out").write_text("")
    assert main(["export-hf", str(tmp_path / "checkpoint"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"mimo export-hf: error: {tmp_path / 'out'} is a file; give a new directory\n"


def pair_export(tmp_path, image_token: bool):
    """A tower + language model pair (a Vicuna-like tokenizer, with or without <image>) exported untrained."""
    from mimo.families.llava import LlavaMimoProvider
    from mimo.families.llava.export import Origin, export_llava
    from mimo.families.llava.hf_load import open_pair
    from tests.data.llava_files import SPECIALS, WORDS, save_tokenizer

    vocab = len(SPECIALS) - (not image_token) + len(WORDS)
    tiny_hf.save_vision(tmp_path / "clip")
    tiny_hf.processor().image_processor.save_pretrained(tmp_path / "clip")
    save_tokenizer(tmp_path / "vicuna", chat_template=None, image_token=image_token)
    tiny_hf.save_language(tmp_path / "vicuna", "llama", vocab_size=vocab)
    hf = open_pair(tmp_path / "clip", tmp_path / "vicuna")
    model = LlavaMimoProvider(**hf.provider_kwargs()).provide()
    return export_llava(model, hf.spec, tmp_path / "out", Origin(vision=tmp_path / "clip",
                                                                 language=tmp_path / "vicuna")), hf.spec


def test_a_pair_export_gets_the_image_token_and_a_processor(tmp_path):
    out, spec = pair_export(tmp_path, image_token=False)
    processor = transformers.LlavaProcessor.from_pretrained(out)
    assert processor.image_token_id == spec.image_token_id == 35 and processor.patch_size == 2
    ids = processor(images=torch.zeros(3, 8, 8), text="<image>\nwhat", return_tensors="pt")["input_ids"][0]
    assert ids.tolist().count(spec.image_token_id) == spec.vision.tokens_per_image == 16


def test_a_tokenizer_whose_image_token_is_another_id_exports_that_id(tmp_path):
    """mimo's data maps the tokenizer's <image> (4) to the model's image id (36, past the vocabulary), so the model
    never read 4 as text: the export names 4 its image id (no vocabulary padding), and transformers' processor
    places images there."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, spec = pair_export(tmp_path, image_token=True)
    config = json.loads((out / "config.json").read_text())
    processor = transformers.LlavaProcessor.from_pretrained(out)
    assert processor.image_token_id == config["image_token_index"] == 4 != spec.image_token_id
    assert config["text_config"]["vocab_size"] == spec.language.vocab_size
    ids = processor(images=torch.zeros(3, 8, 8), text="<image>\nwhat", return_tensors="pt")["input_ids"][0]
    assert ids.tolist().count(4) == spec.vision.tokens_per_image
