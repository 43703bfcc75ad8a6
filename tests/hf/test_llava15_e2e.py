"""LLaVA-1.5 end to end on the CPU (issue 16): stage 1 → stage 2 → `mimo export-hf` → transformers generates.

A tiny random CLIP tower and a Llama language model (with a Vicuna-like tokenizer that has no `<image>`) are
written as local Hugging Face directories, with a few PNGs, a LLaVA-Pretrain JSON and a multi-turn
LLaVA-Instruct JSON (some entries text-only). The run configs are `examples/llava15_stage{1,2}.yaml` with only
paths and sizes changed (float64, 2 steps, tiny batches): their layouts (2 ranks), freezing, templates,
FSDP and packing are the examples' own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from mimo.cli import _checkpoint_model, main
from mimo.data import GlobalBatchSampler
from mimo.families.llava import IMAGES
from mimo.families.llava.hf_load import to_llava_name
from mimo.hf.generate import eos_token_ids, greedy
from mimo.hf.image import ImageProcessor
from mimo.hf.prompt import Prompter
from mimo.training.plan import plan_model
from mimo.training.run_config import parse_run_config
from tests.data.llava_files import WORDS, pretrain_entry, save_entries, save_image, save_tokenizer
from tests.hf import tiny_hf
from tests.test_train_cli import metrics, mimo

transformers = tiny_hf.transformers
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VOCAB = 6 + len(WORDS)  # save_tokenizer's specials (no <image>) and words: the model's image id is the next one
TRAIN = {"steps": 2, "global_batch_size": 4, "num_microbatches": 2, "warmup_steps": 1, "dtype": "float64",
         "compile": False}
QUESTION = "caption"  # with image 0: six words, no early EOS (a vicuna_v1 "USER: … ASSISTANT:" ends at once)
PROMPT = f"<image>\n{QUESTION}"  # what LlavaProcessor and mimo generate make of it without a chat template
PROJECTOR, VISION, LANGUAGE = "modality_submodules.images.projection.", "modality_submodules.images.encoder.", \
    "language_model."


def turns(*texts: str) -> list[dict[str, str]]:
    """LLaVA `conversations`: human and gpt alternating."""
    return [{"from": "gpt" if i % 2 else "human", "value": t} for i, t in enumerate(texts)]


INSTRUCT = [  # LLaVA-Instruct-665K's form: multi-turn, the image anywhere in the first turn, some text-only
    {"id": "0", "image": "0.png", "conversations": turns("<image>\nwhat is this", "a cat", "and now", "a dog")},
    {"id": "1", "conversations": turns("hello", "hi how are you?")},
    {"id": "2", "image": "1.png", "conversations": turns("what is it\n<image>", "a dog")},
    {"id": "3", "conversations": turns("how are you?", "fine", "same", "no")},
    {"id": "4", "image": "2.png", "conversations": turns("<image>\nlook at this", "two cat", "be brief", "cat")},
    {"id": "5", "image": "3.png", "conversations": turns("<image>\ncaption", "a dog and a cat")},
    {"id": "6", "conversations": turns("hi", "hello")},
    {"id": "7", "image": "0.png", "conversations": turns("<image>\nwhat is it", "a cat")},
]


def stage_config(root: Path, stage: int, **changes: dict) -> dict:
    """The example's run config with the tiny directories, data and sizes."""
    config = yaml.safe_load((EXAMPLES / f"llava15_stage{stage}.yaml").read_text())
    changes = {"model": {"vision_hf": str(root / "clip"), "language_hf": str(root / "vicuna")}, "train": TRAIN,
               "log": {"dir": str(root / f"stage{stage}"), "interval": 1}, **changes}
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def run_stage(root: Path, config: dict) -> Path:
    """`mimo train` on `config` (its own two workers); the final checkpoint."""
    path = Path(config["log"]["dir"] + ".yaml")
    path.write_text(yaml.safe_dump(config))
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(config["log"]["dir"]) / "checkpoints" / f"step_{config['train']['steps']:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Directories and data written, stage 1 and stage 2 trained, stage 2 exported."""
    root = tmp_path_factory.mktemp("llava15")
    tiny_hf.save_vision(root / "clip")
    tiny_hf.processor().image_processor.save_pretrained(root / "clip")  # CLIP 8 × 8 preprocessing
    save_tokenizer(root / "vicuna", chat_template=None, image_token=False)
    tiny_hf.save_language(root / "vicuna", "llama", vocab_size=VOCAB)
    for k in range(4):
        save_image(root / "images" / f"{k}.png", width=9 + k, height=8, seed=k)
    captions = ["a cat", "a dog", "two cat", "a dog and a cat"]
    save_entries(root / "pretrain.json", [pretrain_entry(f"{k % 4}.png", captions[k % 4]) for k in range(8)])
    save_entries(root / "instruct.json", INSTRUCT)
    images = str(root / "images")
    stage1 = stage_config(root, 1, data={"path": str(root / "pretrain.json"), "image_folder": images,
                                         "max_seq_len": 64}, checkpoint={"interval": 0})
    stage2 = stage_config(root, 2, data={"path": str(root / "instruct.json"), "image_folder": images,
                                         "max_seq_len": 128, "max_unknown_token_rate": 1.0},  # Vicuna's system
                          checkpoint={"interval": 0, "pretrained_checkpoint": stage1["log"]["dir"]})
    first, second = run_stage(root, stage1), run_stage(root, stage2)
    assert main(["export-hf", str(second), str(root / "exported")]) == 0
    return {"root": root, "configs": (stage1, stage2), "checkpoints": (first, second), "out": root / "exported"}


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def initial(config: dict) -> dict[str, torch.Tensor]:
    """The run's model as it starts: the Hugging Face tower and language model, a seeded projector."""
    return parameters(plan_model(parse_run_config(config)).whole_model_provider().provide())


def assert_part(a: dict, b: dict, prefix: str, equal: bool) -> None:
    """Every parameter under `prefix` is equal in `a` and `b` (`equal`), or at least one differs."""
    names = [n for n in a if n.startswith(prefix)]
    assert names and a.keys() == b.keys()
    same = [torch.equal(a[n], b[n]) for n in names]
    assert all(same) if equal else not all(same), (prefix, equal)


def test_stage1_trains_only_the_projector(runs):
    start = initial(runs["configs"][0])
    trained = parameters(_checkpoint_model(runs["checkpoints"][0])[0])
    assert_part(trained, start, VISION, equal=True)
    assert_part(trained, start, LANGUAGE, equal=True)
    assert_part(trained, start, PROJECTOR, equal=False)


def test_stage2_starts_from_stage1_weights_with_a_fresh_optimizer_and_schedule(runs):
    stage1, stage2 = runs["configs"]
    first, second = runs["checkpoints"]
    logged = [m for m in metrics(Path(stage2["log"]["dir"])) if m["kind"] == "train"]
    assert [m["step"] for m in logged] == [1, 2] and second.name == "step_00000002"
    # the schedule restarted: stage 2's step-1 learning rate is stage 1's, scaled by the ratio of base rates
    lr1 = next(m["lr"] for m in metrics(Path(stage1["log"]["dir"])) if m["kind"] == "train")
    assert logged[0]["lr"] == pytest.approx(lr1 * stage2["train"]["lr"] / stage1["train"]["lr"], rel=1e-12)
    # its first loss is stage 1's model's on stage 2's first batch (packed there, padded here: the same loss)
    config = parse_run_config(stage2)
    provider = plan_model(config).whole_model_provider()
    model, _ = _checkpoint_model(first)
    data = plan_model(config).dataset(provider)
    batch = data.batch(GlobalBatchSampler(len(data), config.train.global_batch_size, config.train.seed).peek())
    with torch.no_grad():
        loss_sum, count = model(batch.input_ids, batch.labels, batch.modality_inputs)
    assert float(loss_sum / count) == pytest.approx(logged[0]["loss"], rel=1e-8)
    # the tower stayed the Hugging Face one; the language model and the projector trained on from stage 1
    start, after1 = initial(stage2), parameters(model)
    trained = parameters(_checkpoint_model(second)[0])
    assert_part(trained, start, VISION, equal=True)
    assert_part(trained, after1, LANGUAGE, equal=False)
    assert_part(trained, after1, PROJECTOR, equal=False)


def test_exported_stage2_loads_in_transformers_and_generates_mimos_tokens(runs):
    out = runs["out"]
    model, plan = _checkpoint_model(runs["checkpoints"][1])
    spec = plan.provider
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, value in model.named_parameters():
            if name.startswith((PROJECTOR, f"{LANGUAGE}layers.1.", f"{LANGUAGE}embed_tokens")):
                exported = f.get_tensor(to_llava_name(name))
                assert torch.equal(exported[:value.shape[0]], value.detach()), name
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float64).eval()
    assert reference.config.image_token_index == spec.image_token_id == VOCAB
    from PIL import Image

    image = Image.open(runs["root"] / "images" / "0.png")
    processor = transformers.LlavaProcessor.from_pretrained(out)  # the exported tokenizer and processor files
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    ids, pixels = inputs["input_ids"][0].tolist(), inputs["pixel_values"].to(torch.float64)
    assert ids == Prompter.from_directory(out).input_ids(QUESTION, spec.vision_config.tokens_per_image)
    assert ids.count(spec.image_token_id) == spec.vision_config.tokens_per_image
    assert torch.equal(pixels[0], ImageProcessor.from_directory(out)(image).to(torch.float64))
    new = greedy(model, ids, {IMAGES: pixels[:1]}, 6, eos_token_ids(out))
    with torch.no_grad():
        want = reference.generate(input_ids=inputs["input_ids"], pixel_values=pixels, max_new_tokens=6,
                                  do_sample=False)
    assert new == want[0, len(ids):].tolist() and len(new) == 6  # no early EOS: six tokens compared


def test_mimo_generate_prints_transformers_words_from_the_checkpoint_and_the_export(runs, capsys):
    out, image = runs["out"], runs["root"] / "images" / "0.png"
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float64).eval()
    processor = transformers.LlavaProcessor.from_pretrained(out)
    from PIL import Image

    from mimo.data.conversation import Conversation, Turn
    from mimo.data.templates import VicunaV1Template

    def transformers_words(prompt: str) -> str:
        inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
        with torch.no_grad():
            want = reference.generate(input_ids=inputs["input_ids"], max_new_tokens=6, do_sample=False,
                                      pixel_values=inputs["pixel_values"].to(torch.float64))
        return processor.tokenizer.decode(want[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    # the checkpoint asks as stage 2 trained (vicuna_v1: "SYSTEM USER: <image>\ncaption ASSISTANT:"); the export,
    # which carries no chat template, as transformers' processor does: the prompt as it is
    trained = VicunaV1Template().render(Conversation((Turn("user", PROMPT), Turn("assistant", "-")))).prompt
    words = {"--checkpoint": transformers_words(trained), "--hf": transformers_words(PROMPT)}
    assert words["--hf"].split() != []
    capsys.readouterr()
    for source in (["--checkpoint", str(runs["checkpoints"][1])], ["--hf", str(out)]):
        args = ["generate", *source, "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "6"]
        assert main(args) == 0
        assert capsys.readouterr().out.split() == words[source[0]].split(), source
