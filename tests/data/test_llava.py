"""LlavaDataset on real files: each format, each template's labels, images, truncation and every bad sample."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from PIL import Image

from mimo.data.bad_samples import BadSample, SkippedSample
from mimo.data.conversation import Conversation, Turn
from mimo.data.templates import TemplateError, VicunaV1Template
from mimo.hf.image import ImageProcessor
from tests.data.llava_files import (
    IMAGE_TOKEN_ID,
    SPECIALS,
    TOKENS_PER_IMAGE,
    WORDS,
    dataset,
    learned,
    open_dataset,
    pretrain_entry,
    save_image,
    words,
)

IMG = ["<IMG>"] * TOKENS_PER_IMAGE
INSTRUCT = {"image": "a.png", "conversations": [
    {"from": "system", "value": "be brief"},
    {"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a cat"},
    {"from": "human", "value": "and now"}, {"from": "gpt", "value": "a dog"}]}
MESSAGES = {"images": ["a.png"], "messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]},
    {"role": "assistant", "content": "a cat"},
    {"role": "user", "content": "and now"}, {"role": "assistant", "content": [{"type": "text", "text": "a dog"}]}]}


def check_next_token_labels(sample) -> None:
    """Every label is the next input id (labels are next-token targets) and none sits on an image token."""
    for t in (sample.labels != -100).nonzero().flatten().tolist():
        assert sample.labels[t] == sample.input_ids[t + 1] != IMAGE_TOKEN_ID


def test_chat_template_labels_only_the_assistant_turns_and_their_end(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    data = dataset(tmp_path, [INSTRUCT])
    sample = data[0]
    assert words(data, sample.input_ids) == [
        "<s>", "<|im_start|>", "system", "be", "brief", "<|im_end|>",
        "<|im_start|>", "user", *IMG, "what", "is", "it", "<|im_end|>",
        "<|im_start|>", "assistant", "a", "cat", "<|im_end|>",
        "<|im_start|>", "user", "and", "now", "<|im_end|>",
        "<|im_start|>", "assistant", "a", "dog", "<|im_end|>"]
    assert learned(data, 0) == ["a", "cat", "<|im_end|>", "a", "dog", "<|im_end|>"]
    check_next_token_labels(sample)


def test_chat_template_with_image_parts_gets_content_lists(tmp_path):
    # a multimodal processor's template iterates content parts; the same entry renders through it
    template = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}"
                "<image> {% else %}{{ p['text'] }}{% endif %}{% endfor %}{% if m['role'] == 'assistant' %} </s>"
                "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    save_image(tmp_path / "images" / "a.png")
    data = dataset(tmp_path, [INSTRUCT], chat_template=template)
    assert data.prompter.reads_image_parts
    assert words(data, data[0].input_ids) == ["<s>", "<unk>", "be", "brief", "<unk>", *IMG, "what", "is", "it",
                                              "<unk>", "a", "cat", "</s>", "<unk>", "and", "now", "<unk>", "a",
                                              "dog", "</s>"]
    assert learned(data, 0) == ["a", "cat", "</s>", "a", "dog", "</s>"]


def test_chat_templates_that_cannot_locate_the_answer_are_refused(tmp_path):
    no_assistant = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    with pytest.raises(TemplateError, match=r"chat template cannot be used for training: .* is not a prefix .*: they "
                                            r"part at character 6: 'A:' against 'hi '; data.template vicuna_v1 "
                                            r"\(LLaVA-1.5's conversations\) or plain \(captions\) need no chat "
                                            r"template"):
        dataset(tmp_path, [INSTRUCT], chat_template=no_assistant)
    with pytest.raises(TemplateError, match="the 'chat' template needs the tokenizer's chat template, and this "
                                            "tokenizer has none"):
        dataset(tmp_path, [INSTRUCT], chat_template=None)


def test_plain_template_is_llava_stage_one(tmp_path):
    # preprocess_plain: the human turn becomes its image alone, then caption + "\n" (dropped by this
    # whitespace tokenizer); labels on the caption only
    save_image(tmp_path / "images" / "a.png")
    data = dataset(tmp_path, [pretrain_entry()], template="plain")
    assert data.template.render(Conversation((Turn("user", "<image>\ncaption"), Turn("assistant", "a cat")),
                                             ("a.png",))).text == "<image>a cat\n"
    assert words(data, data[0].input_ids) == ["<s>", *IMG, "a", "cat"]
    assert learned(data, 0) == ["a", "cat"]
    check_next_token_labels(data[0])
    with pytest.raises(BadSample, match="the plain template takes one user turn with an image"):
        dataset(tmp_path / "two", [INSTRUCT], template="plain")[0]


def test_vicuna_v1_is_llava_s_conversation_format(tmp_path):
    conversation = Conversation((Turn("user", "<image>\nwhat is it"), Turn("assistant", "a cat"),
                                 Turn("user", "and now"), Turn("assistant", "a dog")), ("a.png",))
    rendered = VicunaV1Template().render(conversation)
    # conv_vicuna_v1.get_prompt(): system + sep, then "ROLE: message" + (sep, sep2) alternately
    assert rendered.text == (f"{VicunaV1Template.SYSTEM} USER: <image>\nwhat is it ASSISTANT: a cat</s>"
                             f"USER: and now ASSISTANT: a dog</s>")
    assert [rendered.text[a:b] for a, b in rendered.targets] == ["a cat</s>", "a dog</s>"]
    save_image(tmp_path / "images" / "a.png")
    data = dataset(tmp_path, [INSTRUCT], template="vicuna_v1")
    ids = words(data, data[0].input_ids)
    assert ids[:4] == ["<s>", "be", "brief", "USER:"]  # the entry's own system turn replaces LLaVA's
    assert ids[4:] == [*IMG, "what", "is", "it", "ASSISTANT:", "a", "cat", "</s>", "USER:", "and", "now",
                       "ASSISTANT:", "a", "dog", "</s>"]
    assert learned(data, 0) == ["a", "cat", "</s>", "a", "dog", "</s>"]
    check_next_token_labels(data[0])


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_the_three_forms_give_the_same_sample(tmp_path, name):
    save_image(tmp_path / "images" / "a.png", seed=3)
    llava = dataset(tmp_path / "llava", [INSTRUCT], name=name, image_folder=tmp_path / "images")
    messages = dataset(tmp_path / "messages", [MESSAGES], name=name, image_folder=tmp_path / "images")
    a, b = llava[0], messages[0]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.items["images"], b.items["images"])


def test_a_tokenizer_without_an_image_token_gets_one(tmp_path):
    # a plain language model's tokenizer (LLaVA trains from Vicuna's): <image> added, then mapped to the model's id
    save_image(tmp_path / "images" / "a.png")
    data = dataset(tmp_path, [INSTRUCT], template="vicuna_v1", image_token=False)
    assert data.text_image_id == len(SPECIALS) - 1 + len(WORDS)  # the next id after the vocabulary
    assert words(data, data[0].input_ids)[3:3 + TOKENS_PER_IMAGE + 1] == ["USER:", *IMG]


def test_images_are_preprocessed_and_several_or_none_per_sample(tmp_path):
    for k, name in enumerate(("a.png", "b.png")):
        save_image(tmp_path / "images" / name, width=12, height=8, seed=k)  # resized to the model's 8 × 8
    two = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "look at <image> and <image>"}, {"from": "gpt", "value": "same"}]}
    text = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}
    data = dataset(tmp_path, [two, text])
    images = data[0].items["images"]
    processor = ImageProcessor.square(8)
    assert torch.equal(images, torch.stack([processor(Image.open(tmp_path / "images" / n)).double()
                                            for n in ("a.png", "b.png")]))
    assert words(data, data[0].input_ids) == ["<s>", "<|im_start|>", "user", "look", "at", *IMG, "and", *IMG,
                                              "<|im_end|>", "<|im_start|>", "assistant", "same", "<|im_end|>"]
    assert data[1].items["images"].shape == (0, 3, 8, 8)
    batch = data.batch([0, 1, 0])
    assert batch.modality_inputs["images"].items_per_sample.tolist() == [2, 0, 2]
    assert batch.input_ids.shape == (3, len(data[0].input_ids)) and batch.skipped == ()


def test_a_sample_longer_than_max_seq_len_is_dropped_not_cut(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    length = len(dataset(tmp_path, [INSTRUCT])[0].input_ids)
    assert len(dataset(tmp_path, [INSTRUCT], max_seq_len=length)[0].input_ids) == length
    short = dataset(tmp_path, [INSTRUCT], max_seq_len=length - 1)
    with pytest.raises(BadSample, match=f"sample 0 .*data.json\\[0\\]\\): {length} tokens, more than "
                                        f"max_seq_len={length - 1} \\(dropped, never cut\\)"):
        short[0]


def bad_files(tmp_path):
    """Entries: 0 good, 1 missing image, 2 corrupt image, 3 malformed, 4 too long, 5 good."""
    save_image(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    malformed = {"conversations": [{"from": "gpt", "value": "answer first"}]}
    long = {"conversations": [{"from": "human", "value": "a " * 80}, {"from": "gpt", "value": "cat"}]}
    return [pretrain_entry("a.png", "a cat"), pretrain_entry("missing.png"), pretrain_entry("corrupt.png"),
            malformed, long, pretrain_entry("a.png", "a dog")]


def test_bad_samples_are_skipped_to_the_next_good_one_and_recorded(tmp_path):
    data = dataset(tmp_path, bad_files(tmp_path))
    batch = data.batch(list(range(6)))
    assert [r.index for r in batch.skipped] == [1, 2, 3, 4]
    assert batch.skipped[0] == SkippedSample(1, str(tmp_path / "images" / "missing.png"), "image file not found")
    assert batch.skipped[1].path == str(tmp_path / "images" / "corrupt.png")
    assert batch.skipped[1].reason.startswith("cannot decode the image")
    assert batch.skipped[2].path == f"{tmp_path / 'data.json'}[3]"
    assert batch.skipped[2].reason.startswith("malformed conversation: turns must alternate")
    assert "more than max_seq_len=64" in batch.skipped[3].reason
    # each bad slot holds the next good sample (5), a pure function of the index: the same batch again
    want = data.batch([0, 5, 5, 5, 5, 5])
    assert torch.equal(batch.input_ids, want.input_ids) and torch.equal(batch.labels, want.labels)
    assert torch.equal(batch.modality_inputs["images"].items, want.modality_inputs["images"].items)
    again = data.batch(list(range(6)))
    assert again.skipped == batch.skipped and torch.equal(again.input_ids, batch.input_ids)


def test_the_substitute_wraps_around_and_all_bad_is_an_error(tmp_path):
    entries = bad_files(tmp_path)
    data = dataset(tmp_path, [*entries[:1], entries[1]])
    assert torch.equal(data.batch([1]).input_ids, data.batch([0]).input_ids)
    hopeless = dataset(tmp_path / "hopeless", entries[1:5], image_folder=tmp_path / "images")
    with pytest.raises(BadSample, match="every sample of .* is bad; this one: image file not found"):
        hopeless.batch([0])


def test_on_bad_sample_error_names_the_index_and_path(tmp_path):
    data = dataset(tmp_path, bad_files(tmp_path), on_bad_sample="error")
    data.batch([0, 5])
    with pytest.raises(BadSample, match=f"^sample 1 \\({tmp_path / 'images' / 'missing.png'}\\): image file not "
                                        f"found$"):
        data.batch([0, 1])


def test_a_jsonl_line_that_is_not_json_is_a_bad_sample_named_by_line(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(pretrain_entry()) + "\n\n{not json\n")  # line 2 is empty: not an entry
    data = open_dataset(tmp_path, path)
    assert len(data) == 2 and learned(data, 0) == ["a", "cat", "<|im_end|>"]
    with pytest.raises(BadSample, match=f"sample 1 \\({tmp_path / 'data.jsonl'}:3\\): malformed conversation: not "
                                        f"valid JSON"):
        data[1]


def test_cached_samples_are_made_once(tmp_path):
    data = dataset(tmp_path, bad_files(tmp_path), cache_samples=True)
    assert data[0] is data[0]
    with pytest.raises(BadSample, match="image file not found"):
        data[1]
    save_image(tmp_path / "images" / "missing.png")  # a cached verdict stands: samples are pure functions of i
    with pytest.raises(BadSample, match="image file not found"):
        data[1]


def test_the_dataset_pickles_for_loader_workers(tmp_path):
    data = dataset(tmp_path, bad_files(tmp_path))
    copy = pickle.loads(pickle.dumps(data))
    assert torch.equal(copy[0].input_ids, data[0].input_ids) and torch.equal(copy[0].labels, data[0].labels)
    assert copy.batch([1]).skipped == data.batch([1]).skipped


def test_chat_template_labels_equal_transformers_assistant_mask(tmp_path):
    # a template with {% generation %} markers: transformers' return_assistant_tokens_mask marks the tokens
    # they enclose; the prefix-by-prefix spans must mark the same tokens (text only: no image expansion)
    transformers = pytest.importorskip("transformers")
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}"
                "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    entry = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hello"},
                               {"from": "gpt", "value": "hi"}, {"from": "human", "value": "how are you?"},
                               {"from": "gpt", "value": "fine"}]}
    data = dataset(tmp_path, [entry], chat_template=template)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer" / "tokenizer.json"),
                                                bos_token="<s>", eos_token="</s>", chat_template=template)
    messages = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                for t in entry["conversations"]]
    want = fast.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    sample = data[0]
    assert sample.input_ids.tolist() == want["input_ids"]
    learned_mask = [0] + (sample.labels[:-1] != -100).int().tolist()  # labels[t - 1] targets token t
    assert learned_mask == want["assistant_masks"] and sum(learned_mask) == 4  # hi <|im_end|> fine <|im_end|>


def test_image_paths_outside_the_image_folder_are_bad_samples_unless_allowed(tmp_path):
    """Issue 27: `../outside/secret.png` and absolute paths were opened and trained on with no note."""
    save_image(tmp_path / "images" / "a.png")
    secret = save_image(tmp_path / "outside" / "secret.png")
    (tmp_path / "images" / "sub").mkdir()
    entries = [pretrain_entry("a.png"), pretrain_entry("../outside/secret.png"), pretrain_entry(str(secret)),
               pretrain_entry("sub/../a.png")]
    data = dataset(tmp_path, entries)
    batch = data.batch([0, 1, 2, 3])
    assert [(r.index, r.path) for r in batch.skipped] == [(1, "../outside/secret.png"), (2, str(secret))]
    assert batch.skipped[0].reason == (f"the image path leaves data.image_folder {tmp_path / 'images'} (set "
                                       f"data.allow_paths_outside_image_folder: true to read it)")
    allowed = dataset(tmp_path, entries, allow_paths_outside_image_folder=True)
    assert allowed.batch([0, 1, 2, 3]).skipped == ()


def test_an_image_past_max_image_pixels_is_skipped_before_it_is_decoded(tmp_path):
    """Issue 27: a 12000² image was decoded in full (10x slower steps); now its header is enough to skip it."""
    save_image(tmp_path / "images" / "a.png")
    big = save_image(tmp_path / "images" / "big.png", width=40, height=30)
    big.write_bytes(big.read_bytes()[:60])  # the header holds the size; the pixels are cut off: a decode would fail
    data = dataset(tmp_path, [pretrain_entry("a.png"), pretrain_entry("big.png")], max_image_pixels=1000)
    (record,) = data.batch([0, 1]).skipped
    assert record.reason == "40x30 pixels, more than data.max_image_pixels=1000 (skipped, not decoded)"
