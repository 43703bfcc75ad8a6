"""A preset run (the digits default) served: `generate` prompts and preprocesses as its training data did and
stops where its answers stopped; `export-hf` writes a directory transformers loads and prompts alike (tokenizer,
processor, chat template, EOS). The model is untrained (weights do not change the paths checked); that a trained
digits checkpoint answers the right digit through `generate` was checked on a GPU run (the branch's report)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mimo.data.digits_llava import digits_llava_files
from mimo.families.family import GenerationRequest
from mimo.families.llava import LLAVA, serve
from mimo.hf.generate import greedy
from mimo.models.labels import IGNORE_INDEX
from mimo.training.plan import plan_model
from mimo.training.run_config import parse_run_config
from tests.hf import tiny_hf
from tests.hf.runs import ONE_RANK

transformers = tiny_hf.transformers
QUESTION = "which digit ?"


@pytest.fixture(scope="module")
def digits():
    """The digits default's model section, data section, provider, an untrained model and its held-out data."""
    config = parse_run_config({"parallelism": ONE_RANK, "train": {"dtype": "float64"}})
    plan = plan_model(config)
    provider = plan.whole_model_provider()
    return config, provider, provider.provide().eval(), plan.dataset(provider, "held_out")


def _scan(data, index: int):
    """Held-out sample `index`: (its image file, its prompt ids up to the answer, its answer ids)."""
    sample = data[index]
    first = int((sample.labels != IGNORE_INDEX).nonzero()[0, 0])
    image = digits_llava_files() / "images" / data.entries[index]["image"]
    return image, sample, first


def test_generate_of_a_preset_run_prompts_as_its_training_did(digits):
    config, provider, model, data = digits
    image, sample, first = _scan(data, 0)
    request = GenerationRequest((image,), QUESTION, 2, config.data)
    asked = serve.prompt(config.model, provider, request)
    assert asked.input_ids == sample.input_ids[:first + 1].tolist()  # the chat template's string content, rendered
    assert torch.equal(asked.pixels.to(torch.float64), sample.items["images"])
    eos = asked.prompter.token_id("<eos>")
    assert asked.eos_ids == [eos] and int(sample.labels[(sample.labels != IGNORE_INDEX).nonzero()[-1, 0]]) == eos
    want = asked.prompter.decode(greedy(model, asked.input_ids, {"images": asked.pixels}, 2, [eos]))
    assert LLAVA.generate(model, config.model, provider, request) == want


def test_a_preset_export_is_complete_and_transformers_prompts_it_alike(digits, tmp_path):
    config, provider, model, data = digits
    out, kind = LLAVA.export(model, config.model, config.data, provider, tmp_path / "out")
    assert kind == "LlavaForConditionalGeneration"
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json"):
        assert (out / name).is_file(), name
    image, sample, first = _scan(data, 3)
    processor = transformers.AutoProcessor.from_pretrained(out)
    text = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{QUESTION}"}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
    exported_image_id = json.loads((out / "config.json").read_text())["image_token_index"]
    ids = [provider.image_token_id if i == exported_image_id else i for i in inputs["input_ids"][0].tolist()]
    assert ids == sample.input_ids[:first + 1].tolist()
    assert torch.equal(inputs["pixel_values"][0].to(torch.float64), sample.items["images"][0])
    eos = processor.tokenizer.convert_tokens_to_ids("<eos>")
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == eos
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float64)
    with torch.no_grad():
        want = reference.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    got = greedy(model, sample.input_ids[:first + 1].tolist(), {"images": sample.items["images"]}, 4, [eos])
    assert got == want.tolist()


def test_a_preset_run_without_a_tokenizer_exports_with_a_warning_and_generate_says_why(digits, tmp_path):
    _, provider, model, data = digits
    config = parse_run_config({"parallelism": ONE_RANK, "data": {"name": "synthetic"}})
    with pytest.warns(UserWarning, match="the run trained on synthetic data with no tokenizer"):
        out, _ = LLAVA.export(model, config.model, config.data, provider, tmp_path / "out")
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()
    image, _, _ = _scan(data, 0)
    with pytest.raises(ValueError, match="trained from a preset on data with no tokenizer"):
        LLAVA.generate(model, config.model, provider, GenerationRequest((image,), QUESTION, 2, config.data))
