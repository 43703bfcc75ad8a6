"""`Prompter`'s image token: added once where the prompter is set up, read by a getter without side effects."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from mimo.hf.prompt import Prompter, PromptError
from tests.data.llava_files import save_tokenizer


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
