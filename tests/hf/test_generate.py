"""`mimo generate`: pixels, prompt ids and greedy tokens equal transformers' (LlavaProcessor, generate).

A tiny LLaVA is saved with a word-level tokenizer and a LlavaProcessor (CLIP or SigLIP image processor, with or
without a chat template); every generated word is one token, so equal printed text is equal tokens.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mimo.hf.image import ImageConfigError, ImageProcessor
from mimo.hf.prompt import Prompter
from tests.hf import tiny_hf
from tests.test_train_cli import mimo, refused

transformers = tiny_hf.transformers


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.frombytes("RGB", (width, height), bytes(data.flatten().tolist()))


@pytest.mark.parametrize(("processor", "size"), [
    (lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
     (13, 10)),
    (lambda: transformers.CLIPImageProcessor(), (500, 333)),  # OpenAI CLIP's 224 shortest edge, center crop
    (lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
     (300, 641)),  # upscaled, portrait
    (lambda: transformers.SiglipImageProcessor(size={"height": 8, "width": 8}), (31, 17)),
    (lambda: transformers.SiglipImageProcessor(), (500, 333)),  # SigLIP's 224 × 224, no crop
    # LLaVA-1.5: padded to a square of the mean colour first (landscape, then portrait with odd padding)
    (lambda: transformers.LlavaImageProcessor(do_pad=True, size={"shortest_edge": 8},
                                              crop_size={"height": 8, "width": 8}), (13, 10)),
    (lambda: transformers.LlavaImageProcessor(do_pad=True, size={"shortest_edge": 336},
                                              crop_size={"height": 336, "width": 336}), (300, 641)),
])
def test_pixels_equal_transformers_processor(tmp_path, processor, size):
    reference = processor()
    reference.save_pretrained(tmp_path)
    image = photo(*size)
    want = torch.as_tensor(reference(images=image, return_tensors="pt")["pixel_values"][0])
    got = ImageProcessor.from_directory(tmp_path)(image)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_padding_to_a_square_is_llava_s_expand2square():
    # LLaVA's expand2square: the image centred (odd row at the bottom) on the mean colour, int(mean * 255)
    processor = ImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, do_pad=True,
                               image_mean=(0.5, 0.25, 1.0))
    padded = processor(photo(4, 1))
    assert padded.shape == (3, 4, 4)
    assert torch.equal(padded[:, 1], ImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)(
        photo(4, 1))[:, 0])
    for row in (0, 2, 3):
        assert padded[:, row].tolist() == [[127.0] * 4, [63.0] * 4, [255.0] * 4]


def test_unsupported_image_processors_are_named(tmp_path):
    with pytest.raises(ImageConfigError, match="do_pad=True is LlavaImageProcessor's pad to a square; mimo does not "
                                               "support it for CLIPImageProcessor"):
        ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", "do_pad": True})
    with pytest.raises(ImageConfigError, match="image_processor_type='Idefics3ImageProcessor' is not supported"):
        ImageProcessor.from_dict({"image_processor_type": "Idefics3ImageProcessor"})
    with pytest.raises(ImageConfigError, match="no preprocessor_config.json"):
        ImageProcessor.from_directory(tmp_path)


@pytest.mark.parametrize("template", [None, tiny_hf.LLAVA_TEMPLATE, "{{ bos_token }}" + tiny_hf.LLAVA_TEMPLATE],
                         ids=["no-template", "template", "template-with-bos"])
def test_prompt_ids_equal_llava_processor(tmp_path, template):
    processor = tiny_hf.processor(chat_template=template)
    processor.save_pretrained(tmp_path)
    image = photo(9, 12)
    if template is None:
        want = processor(images=image, text="<image>\ndescribe the image", return_tensors="pt")["input_ids"][0]
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        want = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": "describe the image"}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"][0]
        assert Prompter.from_directory(tmp_path).text("describe the image") == text
    assert Prompter.from_directory(tmp_path).input_ids("describe the image", 16) == want.tolist()


@pytest.mark.parametrize(("kw", "template"), [
    ({}, None),
    ({"vision": "siglip", "text": "qwen2", "vision_feature_select_strategy": "full"}, tiny_hf.LLAVA_TEMPLATE),
], ids=["clip-llama-plain", "siglip-qwen2-chat"])
def test_generate_equals_transformers_greedy(tmp_path, kw, template):
    model = tiny_hf.save_llava(tmp_path, **kw)
    model.generation_config.eos_token_id = 2
    model.generation_config.save_pretrained(tmp_path)
    strategy = kw.get("vision_feature_select_strategy", "default")
    processor = tiny_hf.processor(kw.get("vision", "clip"), strategy, template)
    processor.save_pretrained(tmp_path)
    image = photo(11, 9, seed=4)
    image.save(tmp_path / "photo.png")
    prompt = "describe the image please"
    if template is None:
        inputs = processor(images=image, text=f"<image>\n{prompt}", return_tensors="pt")
    else:
        inputs = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    want = processor.tokenizer.decode(new, skip_special_tokens=True)
    done = mimo("generate", "--hf", str(tmp_path), "--image", str(tmp_path / "photo.png"), "--prompt", prompt,
                "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == want.strip() and len(new) == 12, (new, want)
    assert len(want.split()) == len([t for t in new if t > 2])  # one word per token: equal text is equal tokens


def test_generate_bad_inputs_are_one_line(tmp_path):
    tiny_hf.save_llava(tmp_path)
    done = refused("generate", "--hf", str(tmp_path), "--image", str(tmp_path / "none.png"), "--prompt", "x")
    assert done.returncode == 2 and "cannot read it as an image" in done.stderr
    assert done.stderr.count("\n") == 1


def test_generate_from_a_checkpoint_uses_its_origin_files(tmp_path, unchanged_llava):
    source, checkpoint = unchanged_llava  # trained at lr 0: the same weights, so the same words
    photo(8, 8).save(tmp_path / "photo.png")
    args = ["--image", str(tmp_path / "photo.png"), "--prompt", "describe the image", "--max-new-tokens", "6"]
    from_hf, from_checkpoint = mimo("generate", "--hf", str(source), *args), mimo("generate", "--checkpoint",
                                                                                   str(checkpoint), *args)
    assert from_hf.returncode == from_checkpoint.returncode == 0, from_checkpoint.stderr[-2000:]
    assert from_hf.stdout == from_checkpoint.stdout and len(from_hf.stdout.split()) == 6


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A tiny CLIP + Llama LLaVA directory with its processor (max_seq_len 256, 16 tokens an image) and a photo."""
    directory = tmp_path_factory.mktemp("tiny_llava")
    tiny_hf.save_llava(directory)
    tiny_hf.processor().save_pretrained(directory)
    photo(8, 8).save(directory / "photo.png")
    return directory


def _generate(capsys, directory, *args: str) -> tuple[int, str, str]:
    """`mimo generate --hf DIRECTORY ARGS` in this process: (exit code, stdout, stderr)."""
    from mimo.cli import main

    code = main(["generate", "--hf", str(directory), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_stops_at_max_seq_len_prints_and_says_why(tiny_llava, capsys):
    # BOS, 16 image tokens, 236 words: 253 of 256 positions, so 3 tokens are generated, printed, and the stop named
    image = ["--image", str(tiny_llava / "photo.png")]
    code, out, err = _generate(capsys, tiny_llava, *image, "--prompt", " ".join(["describe"] * 236),
                               "--max-new-tokens", "100000")
    assert code == 0 and out.strip() and len(out.split()) <= 3, (out, err)
    assert err == ("warning: stopped after 3 of --max-new-tokens 100000 tokens: the prompt (253 tokens) and the "
                   "answer reached the model's max_seq_len of 256\n")
    code, out, err = _generate(capsys, tiny_llava, *image, "--prompt", " ".join(["describe"] * 3000))
    assert code == 2 and out == "" and err == ("mimo generate: error: --prompt: the prompt is 3017 tokens with its "
                                               "images, and the model's max_seq_len is 256: no room to generate; "
                                               "shorten the prompt\n")


def test_generate_bombs_and_truncated_weights_are_one_line(tiny_llava, tmp_path, capsys):
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 400 M pixels, a few KB on disk
    code, _, err = _generate(capsys, tiny_llava, "--image", str(tmp_path / "bomb.png"), "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "bomb.png: too large to decode safely" in err, err
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in tiny_llava.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    code, _, err = _generate(capsys, truncated, "--image", str(truncated / "photo.png"), "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "model.safetensors: not a readable safetensors file" in err, err


def test_prompt_placeholders_place_the_images_in_generate(tiny_llava, capsys):
    """`<image>` after the question puts the image there (written twice with two --image, two images); the
    answer equals transformers' for the same placement."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    processor = transformers.LlavaProcessor.from_pretrained(tiny_llava)
    image = Image.open(tiny_llava / "photo.png")
    for prompt, images in (("describe <image>", [image]), ("<image> and <image> please", [image, image])):
        inputs = processor(images=images, text=prompt, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        args = [a for _ in images for a in ("--image", str(tiny_llava / "photo.png"))]
        code, out, err = _generate(capsys, tiny_llava, *args, "--prompt", prompt, "--max-new-tokens", "5")
        assert code == 0, err
        assert out.strip() == processor.tokenizer.decode(new, skip_special_tokens=True).strip()
