"""Qwen-VL's LLaVA-format data and `mimo generate` equal transformers' processor, chat template and greedy `generate`.

Tiny random Qwen2.5-VL and Qwen3-VL directories are made by the example script (`examples/tiny_hf_qwen_vl.py`: a
byte-level BPE tokenizer with Qwen's special tokens built on the spot, each family's chat template, the image
processor's config); nothing is downloaded. transformers' Qwen processors also build a video processor, which needs
torchvision; the reference here is the same processor class without it (`_ImagesOnly`), images and text only.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mimo.cli import main
from mimo.config import ConfigFileError, RunConfigError
from mimo.data.section import DataSection
from mimo.families.family import GenerationRequest
from mimo.families.qwen_vl import QWEN_VL, QwenVLMimoProvider, QwenVLSection, open_qwen_vl
from mimo.models.labels import IGNORE_INDEX

transformers = pytest.importorskip("transformers")
from transformers.processing_utils import ProcessorMixin  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KINDS = ("qwen2_5_vl", "qwen3_vl")
SIZES = {"a.png": (50, 90), "b.png": (120, 45), "c.png": (64, 64)}  # (height, width): wide, tall, square


def _script():
    """examples/tiny_hf_qwen_vl.py as a module."""
    spec = importlib.util.spec_from_file_location("tiny_hf_qwen_vl", EXAMPLES / "tiny_hf_qwen_vl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()
# each entry, and the messages transformers' chat template is given for it (mimo's reading of the entry)
ENTRIES = [
    ({"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nwhat color is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and this one <image> here?"}, {"from": "gpt", "value": "blue, mostly."}]},
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
      {"role": "user", "content": [{"type": "text", "text": "and this one "}, {"type": "image"},
                                   {"type": "text", "text": " here?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "blue, mostly."}]}]),
    ({"images": ["c.png"], "messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "name the color."}]},
        {"role": "assistant", "content": "green"}]},
     [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "name the color."}]},
      {"role": "assistant", "content": [{"type": "text", "text": "green"}]}]),
    ({"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "white"}]},
     [{"role": "user", "content": [{"type": "text", "text": "hello"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "white"}]}]),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Both families' tiny directories (weights large enough that greedy choices are clear) and the images."""
    root = tmp_path_factory.mktemp("qwen_data")
    for kind in KINDS:
        SCRIPT.save_model(root / kind, kind, initializer_range=0.3)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
    (root / "data.json").write_text(json.dumps([entry for entry, _ in ENTRIES]))
    return root


def _processor(kind: str, directory: Path, **pixels):
    """transformers' Qwen processor of `kind` over the directory's tokenizer, chat template and image processor
    (its min/max pixels overridden by `pixels`), without the video processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    base = transformers.Qwen2_5_VLProcessor if kind == "qwen2_5_vl" else transformers.Qwen3VLProcessor

    class _ImagesOnly(base):
        def __init__(self, image_processor, tokenizer, chat_template):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"  # Qwen3-VL's

    images = Qwen2VLImageProcessorPil.from_pretrained(directory)
    if pixels:
        images = Qwen2VLImageProcessorPil(**{**images.to_dict(), "size": {"shortest_edge": pixels["min_pixels"],
                                                                          "longest_edge": pixels["max_pixels"]}})
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return _ImagesOnly(images, tokenizer, (directory / "chat_template.jinja").read_text())


def _assistant_labels(ids: list[int], tokenizer) -> list[int]:
    """Next-token labels on each assistant turn after its `<|im_start|>assistant\\n` header, through its
    `<|im_end|>\\n` (the rule of Qwen-VL's own fine-tuning code), found on the token ids."""
    header = tokenizer("<|im_start|>assistant\n")["input_ids"]
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    learn, inside = [False] * len(ids), False
    for t in range(len(ids)):
        if ids[t] == start_id:
            inside = ids[t:t + len(header)] == header
            skip = len(header)
        learn[t] = inside and skip <= 0
        skip -= 1
    return [ids[t + 1] if t + 1 < len(ids) and learn[t + 1] else IGNORE_INDEX for t in range(len(ids))]


@pytest.mark.parametrize(("kind", "pixels"), [
    ("qwen2_5_vl", {}),  # the directory's bounds
    ("qwen3_vl", {"min_pixels": 32 * 32 * 2, "max_pixels": 32 * 32 * 6}),  # data.min_pixels / max_pixels
], ids=["qwen2.5-vl", "qwen3-vl-pixels"])
def test_samples_equal_transformers_processor_and_chat_template(root, kind, pixels):
    """Each sample (two non-square images in two turns, the messages form with a system turn, text only): input ids,
    labels on the assistant turns only, pixel_values and image_grid_thw equal transformers'."""
    directory = root / kind
    data = DataSection(name="llava", path=str(root / "data.json"), image_folder=str(root / "images"), **pixels)
    section = QwenVLSection(hf=str(directory))
    opened = QWEN_VL.open(section)
    provider = QwenVLMimoProvider(opened.spec)
    QWEN_VL.check_data(data, section, opened, provider)
    dataset = QWEN_VL.dataset(data, section, opened, provider, "train", torch.float32)
    reference = _processor(kind, directory, **pixels)
    for index, (entry, messages) in enumerate(ENTRIES):
        names = entry.get("image", entry.get("images", []))
        images = [Image.open(root / "images" / name) for name in names]
        text = reference.apply_chat_template(messages, tokenize=False)
        want = reference(images=images or None, text=[text], return_tensors="pt")
        sample = dataset[index]
        ids = want["input_ids"][0].tolist()
        assert sample.input_ids.tolist() == ids, index
        assert sample.labels.tolist() == _assistant_labels(ids, reference.tokenizer), index
        if images:
            assert torch.equal(sample.item_grids["images"], want["image_grid_thw"])
            torch.testing.assert_close(sample.items["images"], want["pixel_values"], rtol=0, atol=1e-6)
        else:
            assert sample.items["images"].shape == (0, opened.spec.vision.patch_dim)
            assert sample.item_grids["images"].shape == (0, 3)


@pytest.mark.parametrize("kind", KINDS, ids=["qwen2.5-vl", "qwen3-vl"])
def test_generate_equals_transformers_greedy_generate(root, kind, capsys):
    """`mimo generate --hf DIR` of two images of different sizes, the second placed by `<image>` in the prompt:
    transformers' greedy ids (prompt through its processor and chat template) and their text."""
    from mimo.families.qwen_vl import serve

    directory = root / kind
    section = QwenVLSection(hf=str(directory))
    opened = open_qwen_vl(directory)
    provider = QwenVLMimoProvider(opened.spec, initial_weights=opened.weights())
    model = provider.provide()
    paths = (root / "images" / "b.png", root / "images" / "a.png")
    request = GenerationRequest(paths, "<image>\ncompare with <image> please", 10)
    asked = serve.prompt(section, provider, request)
    reference = _processor(kind, directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "compare with "},
                                             {"type": "image"}, {"type": "text", "text": " please"}]}]
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = reference(images=[Image.open(p) for p in paths], text=[text], return_tensors="pt")
    assert asked.input_ids == inputs["input_ids"][0].tolist()
    hf = getattr(transformers, SCRIPT.KINDS[kind][1]).from_pretrained(directory).eval()
    with torch.no_grad():
        want = hf.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert len(want) >= 3  # the comparison means something
    got = serve.generate(model, section, provider, request)
    assert got == reference.tokenizer.decode(want, skip_special_tokens=True)
    assert main(["generate", "--hf", str(directory), "--image", str(paths[0]), "--image", str(paths[1]), "--prompt",
                 request.prompt, "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == got + "\n"


def test_generate_of_a_checkpoint_equals_transformers(root, tmp_path):
    """`mimo train` of a Qwen3-VL directory on LLaVA-format data (one step, a learning rate too small to move a
    weight's float32 value by more than rounding), then `mimo generate --checkpoint`: the directory's greedy text in
    transformers, through the run's tokenizer, template and image processing."""
    from tests.test_train_cli import in_process, mimo

    directory, run_dir = root / "qwen3_vl", tmp_path / "run"
    config = {"model": {"family": "qwen_vl", "hf": str(directory)},
              "parallelism": {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}},
              "train": {"steps": 1, "global_batch_size": 2, "num_microbatches": 1, "lr": 1e-12, "dtype": "float32"},
              "data": {"name": "llava", "path": str(root / "data.json"), "image_folder": str(root / "images"),
                       "num_workers": 0},
              "checkpoint": {"interval": 0}, "eval": {"enabled": False}, "log": {"dir": str(run_dir)}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    image = root / "images" / "a.png"
    asked = in_process("generate", "--checkpoint", str(run_dir / "checkpoints" / "step_00000001"), "--image",
                       str(image), "--prompt", "what color is it?", "--max-new-tokens", "8")
    assert asked.returncode == 0, asked.stderr
    reference = _processor("qwen3_vl", directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]}]
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = reference(images=[Image.open(image)], text=[text], return_tensors="pt")
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(directory).eval()
    with torch.no_grad():
        want = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert asked.stdout == reference.tokenizer.decode(want, skip_special_tokens=True) + "\n"


def test_a_run_generates_with_its_training_rendering_and_pixel_bounds(root, tmp_path):
    """A checkpoint's generate (its run's data section: data.max_pixels below the directory's) prompts exactly as its
    training sample up to the answer: the same ids, the same packed pixels and grid."""
    from mimo.families.qwen_vl import serve

    entry = {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\nwhat color is it?"},
                                                 {"from": "gpt", "value": "red"}]}
    (tmp_path / "one.json").write_text(json.dumps([entry]))
    data = DataSection(name="llava", path=str(tmp_path / "one.json"), image_folder=str(root / "images"),
                       max_pixels=28 * 28 * 4)
    section = QwenVLSection(hf=str(root / "qwen2_5_vl"))
    opened = QWEN_VL.open(section)
    provider = QwenVLMimoProvider(opened.spec)
    sample = QWEN_VL.dataset(data, section, opened, provider, "train", torch.float32)[0]
    first = int((sample.labels != IGNORE_INDEX).nonzero()[0, 0])
    asked = serve.prompt(section, provider, GenerationRequest((root / "images" / "b.png",), "what color is it?", 4,
                                                              data))
    assert asked.input_ids == sample.input_ids[:first + 1].tolist()
    assert torch.equal(asked.images.item_grids, sample.item_grids["images"])
    assert asked.images.item_grids.tolist() == [[1, 6, 2]]  # 3 tokens (data.max_pixels); the directory's: 1, 8, 4
    assert torch.equal(asked.images.items, sample.items["images"])


def test_an_export_carries_the_run_s_tokenizer_and_pixel_bounds(root, tmp_path):
    """A run with data.max_pixels (and a preset run with data.tokenizer) exports the image processing and tokenizer
    it trained with: transformers' processor loaded from the export cuts an image as the training sample was cut."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mimo.families.qwen_vl.hf_presets import qwen_vl_preset

    image = root / "images" / "b.png"
    data = DataSection(name="llava", path=str(root / "data.json"), image_folder=str(root / "images"),
                       max_pixels=28 * 28 * 4)
    section = QwenVLSection(hf=str(root / "qwen2_5_vl"))
    opened = QWEN_VL.open(section)
    provider = QwenVLMimoProvider(opened.spec)
    sample = QWEN_VL.dataset(data, section, opened, provider, "train", torch.float32)[0]  # a.png, then b.png
    out, _ = QWEN_VL.export(provider.provide(), section, data, provider, tmp_path / "run")
    grids = Qwen2VLImageProcessorPil.from_pretrained(out)([Image.open(image)], return_tensors="pt")["image_grid_thw"]
    assert grids.tolist() == sample.item_grids["images"][1:].tolist() == [[1, 6, 2]]
    preset, tokenizer = QwenVLSection(preset="tiny-qwen2.5-vl"), str(root / "qwen2_5_vl")
    provider = QwenVLMimoProvider(qwen_vl_preset(preset.preset))
    out, _ = QWEN_VL.export(provider.provide(), preset, DataSection(**{**vars(data), "tokenizer": tokenizer}),
                            provider, tmp_path / "preset")
    assert (out / "tokenizer.json").read_bytes() == (root / "qwen2_5_vl" / "tokenizer.json").read_bytes()
    assert (out / "chat_template.jinja").is_file()
    reference = Qwen2VLImageProcessorPil.from_pretrained(out)  # the preset's 2-px patches, data.max_pixels
    assert reference.patch_size == 2 and reference.size["longest_edge"] == 28 * 28 * 4


def test_held_out_loss_equals_transformers(root):
    """The held-out loss of Qwen-VL data (padded batches of two: M-RoPE positions per row, the text-only sample
    among them) is transformers' mean cross-entropy over the same labels (without M-RoPE it is not)."""
    from mimo.training.evaluate import held_out_loss

    directory = root / "qwen2_5_vl"
    data = DataSection(name="llava", path=str(root / "data.json"), image_folder=str(root / "images"))
    section = QwenVLSection(hf=str(directory))
    opened = QWEN_VL.open(section)
    provider = QwenVLMimoProvider(opened.spec, initial_weights=opened.weights())
    dataset = QWEN_VL.dataset(data, section, opened, provider, "train", torch.float32)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(directory).eval()
    total, count = 0.0, 0
    for index in range(len(dataset)):
        sample = dataset[index]
        images = {"pixel_values": sample.items["images"], "image_grid_thw": sample.item_grids["images"]} \
            if len(sample.item_grids["images"]) else {}
        ids = sample.input_ids[None]
        with torch.no_grad():
            logits = hf(input_ids=ids, mm_token_type_ids=(ids == opened.spec.image_token_id).int(), **images).logits[0]
        keep = sample.labels != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[keep], sample.labels[keep], reduction="sum"))
        count += int(keep.sum())
    model = provider.provide()
    loss, samples = held_out_loss(model, dataset, batch_size=2, positions=provider.text_positions)
    assert samples == 3 and abs(loss - total / count) <= 1e-5 * total / count, (loss, total / count)
    plain, _ = held_out_loss(model, dataset, batch_size=2)
    assert abs(plain - loss) > 1e-4


def test_what_qwen_vl_data_cannot_be_is_one_line(root):
    """LLaVA's templates, crossed pixel bounds, a preset with no tokenizer, a processor whose patches the tower
    cannot take, LLaVA given pixel bounds, and generate from a preset run on synthetic data: one line each."""
    from mimo.families.llava import LLAVA, LlavaMimoProvider, LlavaSection
    from mimo.families.qwen_vl import serve
    from mimo.families.qwen_vl.hf_presets import qwen_vl_preset

    mixed = root / "mixed"  # a Qwen3-VL directory holding Qwen2.5-VL's 14-px image processor
    mixed.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (mixed / name).write_bytes((root / "qwen3_vl" / name).read_bytes())
    (mixed / "preprocessor_config.json").write_bytes((root / "qwen2_5_vl" / "preprocessor_config.json").read_bytes())
    llava = {"name": "llava", "path": str(root / "data.json"), "image_folder": str(root / "images")}
    hf, mixed_section = QwenVLSection(hf=str(root / "qwen2_5_vl")), QwenVLSection(hf=str(mixed))
    preset = QwenVLMimoProvider(qwen_vl_preset("tiny-qwen2.5-vl"))  # the hooks read the model from its provider
    cases = {
        "data.template: the qwen_vl family renders conversations through the directory's chat template (chat)":
            lambda: QWEN_VL.check_data(DataSection(**llava, template="vicuna_v1"), hf, QWEN_VL.open(hf), preset),
        "data: min_pixels 5000 exceeds max_pixels 4000; give min_pixels <= max_pixels":
            lambda: DataSection(**llava, min_pixels=5000, max_pixels=4000),
        "data.tokenizer: a preset model has no tokenizer; give data.tokenizer":
            lambda: QWEN_VL.check_data(DataSection(**llava), QwenVLSection(), None, preset),
        "preprocessor_config.json: patch_size=14, but the vision tower's is 16; the image processor must cut":
            lambda: QWEN_VL.check_data(DataSection(**llava), mixed_section, QWEN_VL.open(mixed_section), preset),
        "data.max_pixels: bounds a native-resolution image's pixels (model.family qwen_vl)":
            lambda: LLAVA.check_data(DataSection(**llava, max_pixels=4000), LlavaSection(), None,
                                     LlavaMimoProvider.preset("tiny")),
    }
    for message, call in cases.items():
        with pytest.raises(RunConfigError) as raised:
            call()
        assert message in str(raised.value) and "\n" not in str(raised.value), (message, str(raised.value))
    # a preset with a tokenizer reads the data (transformers' default bounds at the tower's 2-px patches)
    QWEN_VL.check_data(DataSection(**llava, tokenizer=str(root / "qwen2_5_vl")), QwenVLSection(), None, preset)
    with pytest.raises(ConfigFileError, match="trained from a preset on data with no tokenizer"):
        serve.prompt(QwenVLSection(), preset, GenerationRequest((root / "images" / "a.png",), "hi", 4,
                                                                DataSection(name="synthetic")))


def test_the_tiny_sft_example_is_a_valid_run_over_its_script_s_files(tmp_path):
    """examples/qwen25vl_tiny_sft.yaml over what examples/tiny_hf_qwen_vl.py writes (the README's line): a valid run
    on its 2 ranks whose held-out samples carry packed images of several sizes and labels on the answer alone (the
    run itself: about 40 s on 2 cores; not run here). The 7B recipe validates against the 7B shapes on its 8 ranks."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "python examples/tiny_hf_qwen_vl.py runs/tiny-qwen-vl && mimo train examples/qwen25vl_tiny_sft.yaml" in \
        readme
    SCRIPT.write_data(tmp_path / "tiny-qwen-vl", splits={"train": 8, "held_out": 8})  # the script's files, fewer
    SCRIPT.save_model(tmp_path / "tiny-qwen-vl" / "model")
    text = (EXAMPLES / "qwen25vl_tiny_sft.yaml").read_text().replace("runs/", f"{tmp_path}/")
    from mimo.training.plan import plan_run
    from mimo.training.run_config import parse_run_config

    config = parse_run_config(yaml.safe_load(text))
    plan = plan_run(config, 2)
    assert config.evaluates and plan.warnings == []
    held_out = plan.dataset(plan.whole_model_provider(), "held_out")
    grids = {tuple(held_out[i].item_grids["images"][0].tolist()) for i in range(8)}
    assert len(grids) > 3
    sample = held_out[0]
    learned = held_out.prompter.decode(sample.labels[sample.labels != IGNORE_INDEX].tolist())
    answer = json.loads((tmp_path / "tiny-qwen-vl" / "held_out.json").read_text())[0]["conversations"][1]["value"]
    assert learned == answer + "\n"  # the answer, its <|im_end|> (a special token: not decoded) and the newline
    recipe = yaml.safe_load((EXAMPLES / "qwen25vl_sft.yaml").read_text())
    recipe["model"] = {"family": "qwen_vl", "preset": "qwen2.5-vl-7b"}  # the 7B's shapes, no weights
    recipe["data"].update(path=str(tmp_path / "tiny-qwen-vl" / "train.json"), tokenizer=str(tmp_path / "tiny-qwen-vl"
                          / "model"), image_folder=str(tmp_path / "tiny-qwen-vl" / "images"))
    seven = parse_run_config(recipe)
    assert plan_run(seven, 8).config.layout.deployment == "colocated" and seven.world_size == 8
