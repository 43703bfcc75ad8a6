"""`Prompter`: its image token (added once where the prompter is set up, read by a getter without side effects), and
one rendering of a turn for training and generation."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from mimo.data.conversation import Conversation, Turn
from mimo.data.digits_llava import CHAT_TEMPLATE as DIGITS_TEMPLATE
from mimo.data.templates import ChatTemplate
from mimo.hf.prompt import Prompter, PromptError
from tests.data.llava_files import CHATML, save_tokenizer


def _size(prompter: Prompter) -> int:
    return prompter.tokenizer.get_vocab_size(with_added_tokens=True)


def test_the_image_token_id_getter_changes_nothing(tmp_path):
    """A tokenizer without `<image>` handed to the prompter as it is: the getter says so and adds nothing."""
    tokenizer = Tokenizer.from_file(str(save_tokenizer(tmp_path, image_token=False) / "tokenizer.json"))
    prompter = Prompter(tokenizer, {}, None)
    size = _size(prompter)
    with pytest.raises(PromptError, match="the tokenizer has no image token '<image>'; give it one first"):
        prompter.image_token_id()
    assert _size(prompter) == size and prompter.token_id("<image>") is None


def test_setting_up_from_a_directory_adds_the_image_token_once(tmp_path):
    """A plain language model's tokenizer (LLaVA trains from Vicuna's) gets `<image>` appended when the prompter is
    set up; adding again and reading the id change nothing."""
    save_tokenizer(tmp_path, image_token=False)
    size = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    prompter = Prompter.from_directory(tmp_path)
    assert _size(prompter) == size + 1 and prompter.image_token_id() == size
    assert prompter.add_image_token() == prompter.image_token_id() == size and _size(prompter) == size + 1


def test_a_tokenizer_with_the_image_token_keeps_its_id(tmp_path):
    save_tokenizer(tmp_path)
    size = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    prompter = Prompter.from_directory(tmp_path)
    assert _size(prompter) == size and prompter.image_token_id() == 4  # its place among the specials


PARTS = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}<image> "
         "{% else %}{{ p['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant: "
         "{% endif %}")


@pytest.mark.parametrize("template", [DIGITS_TEMPLATE, CHATML, PARTS], ids=["digits", "chatml", "parts"])
@pytest.mark.parametrize("question", ["<image>\nwhat is it", "what is it <image>"], ids=["image-first", "image-last"])
def test_generation_renders_a_turn_as_training_does(tmp_path, template, question):
    """The text `generate` prompts with is the training rendering up to the answer, for templates that print a
    string content (mimo's digits, ChatML) and templates that read image parts; wherever the data puts
    `<image>`, a prompt writing it there gets it there."""
    prompter = Prompter.from_directory(save_tokenizer(tmp_path, chat_template=template))
    rendered = ChatTemplate(prompter).render(Conversation((Turn("user", question), Turn("assistant", "a cat")),
                                                          ("a.png",)))
    assert prompter.text(question) == rendered.text[:rendered.targets[0][0]]
    if question.startswith("<image>"):  # no placeholder: the image goes first, as LLaVA's data puts it
        assert prompter.text("what is it") == prompter.text(question)


def test_prompt_placeholders_place_the_images(tmp_path):
    prompter = Prompter.from_directory(save_tokenizer(tmp_path))
    image = prompter.image_token_id()
    ids = prompter.input_ids("look <image> and <image> now", 2, model_image_id=100, images=2)
    words = [prompter.tokenizer.id_to_token(i) if i != 100 else "IMG" for i in ids]
    assert words == ["<s>", "<|im_start|>", "user", "look", "IMG", "IMG", "and", "IMG", "IMG", "now", "<|im_end|>",
                     "<|im_start|>", "assistant"] and image not in ids
    with pytest.raises(PromptError, match=r"holds 2 <image> placeholder\(s\) for 1 image\(s\)"):
        prompter.input_ids("look <image> and <image>", 2)
