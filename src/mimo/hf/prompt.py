"""Text → token ids as transformers' `LlavaProcessor` makes them, with the `tokenizers` runtime (tokenizer.json).

With a chat template the prompt is one user turn holding the image(s) and the text, rendered with
`add_generation_prompt` in a sandboxed Jinja environment set up as transformers sets it up (jinja2 is
what transformers itself uses; mimo imports it only here); without one the text is `<image>\\n` + prompt.
A turn becomes a chat-template message in one place (`Prompter.message`), for training data and generation
alike: a list of image and text parts when the template reads image parts, else the string with `<image>` inline.
A prompt's own `<image>` placeholders place its images; a prompt without one gets `<image>\\n` before its text
(LLaVA's layout, and the image part first for a template that reads parts: the template decides where it goes).
Each image token is then repeated to the image's token count, and the text tokenized, special tokens added
unless the rendered text already starts with the BOS token (transformers' rule). Training data renders whole
conversations through the same template (`render`) and tokenizes with character offsets (`encode`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Encoding, Tokenizer

IMAGE_TOKEN = "<image>"


class PromptError(ValueError):
    """A directory whose tokenizer or chat template cannot be used."""


@dataclass
class Prompter:
    """A directory's tokenizer, special tokens and (optional) chat template."""

    tokenizer: Tokenizer
    special_tokens: dict[str, str]
    chat_template: str | None
    image_token: str = IMAGE_TOKEN

    @classmethod
    def from_directory(cls, directory: str | Path, default_image_token: str = IMAGE_TOKEN) -> Prompter:
        """Read tokenizer.json, tokenizer_config.json and the processor's chat template (if any), and give the
        tokenizer its image token if it has none (`add_image_token`): every user of a prompter reads images. The
        image token is the processor's or tokenizer's `image_token`, else `default_image_token` (the model
        family's: LLaVA's `<image>`, Qwen-VL's `<|image_pad|>`, as their processors default)."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise PromptError(f"{directory}: no tokenizer.json (the fast tokenizer file mimo runs)")
        config = _json(directory / "tokenizer_config.json")
        specials = {k: _content(v) for k, v in {**_json(directory / "special_tokens_map.json"), **config}.items()
                    if k.endswith("_token") and _content(v) is not None}
        processor = _json(directory / "processor_config.json")
        image_token = processor.get("image_token", config.get("image_token", default_image_token))
        prompter = cls(Tokenizer.from_file(str(directory / "tokenizer.json")), specials,
                       _chat_template(directory, config), image_token)
        prompter.add_image_token()
        return prompter

    @property
    def reads_image_parts(self) -> bool:
        """Whether the chat template reads image parts (`{"type": "image"}`) in a message's content, as a
        multimodal processor's template does; else it prints each content as a string."""
        template = self.chat_template
        return template is not None and ("'image'" in template or '"image"' in template)

    def message(self, role: str, text: str) -> dict[str, Any]:
        """One turn (`<image>` where each image sits) as a chat-template message: image and text parts for a
        template that reads parts, else the string. The one place a turn's form is decided, so training data and
        `generate` render a turn alike."""
        return {"role": role, "content": image_parts(text) if self.reads_image_parts else text}

    def text(self, prompt: str, images: int = 1) -> str:
        """The text before image expansion of a one-turn prompt about `images` images: the prompt's own `<image>`
        placeholders place them, else `<image>\\n` per image goes before its text; then the chat template's
        rendering with the generation prompt, if the tokenizer has one."""
        if IMAGE_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN}\n" * images + prompt
        if self.chat_template is None:
            return prompt
        return self.render([self.message("user", prompt)], add_generation_prompt=True)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """`messages` through the chat template, as transformers' `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise PromptError("the tokenizer has no chat template to render a conversation with")
        return _compile(self.chat_template).render(messages=list(messages), tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def adds_special_tokens(self, text: str) -> bool:
        """Whether tokenizing `text` adds the tokenizer's special tokens: not when a chat template's rendering
        already starts with the BOS token (transformers' rule)."""
        bos = self.special_tokens.get("bos_token")
        return not (self.chat_template is not None and bos is not None and text.startswith(bos))

    def encode(self, text: str, add_special_tokens: bool) -> Encoding:
        """The tokenizer's encoding of `text`: ids and each token's character offsets."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (e.g. the image token), or None."""
        return self.tokenizer.token_to_id(token)

    def add_image_token(self) -> int:
        """Add the image token to a tokenizer without one (a plain language model's, as in LLaVA's own training;
        callers map it to the model's image id) as a special token; done once where the prompter is set up
        (`from_directory`), a no-op if it is there. Its id."""
        if self.token_id(self.image_token) is None:
            from tokenizers import AddedToken

            self.tokenizer.add_special_tokens([AddedToken(self.image_token, special=True)])
        return self.image_token_id()

    def image_token_id(self) -> int:
        """The tokenizer's id of its image token, or a PromptError if it has none (see `add_image_token`)."""
        token_id = self.token_id(self.image_token)
        if token_id is None:
            raise PromptError(f"the tokenizer has no image token {self.image_token!r}; give it one first "
                              f"(Prompter.add_image_token, which Prompter.from_directory calls)")
        return token_id

    def input_ids(self, prompt: str, image_tokens: int | Sequence[int], model_image_id: int | None = None,
                  images: int = 1) -> list[int]:
        """Token ids of the prompt (`text`) about `images` images, image i expanded to `image_tokens` image tokens
        (one count for every image, or each image's own: native-resolution towers), written as `model_image_id` if
        given (a model trained from a tower and a language model has its own image id)."""
        return self.prompt_ids(self.text(prompt, images), image_tokens, model_image_id, images)

    def prompt_ids(self, text: str, image_tokens: int | Sequence[int], model_image_id: int | None = None,
                   images: int = 1, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of a rendered prompt (`text`, or a held-out conversation rendered up to its answer) about
        `images` images, expanded as `input_ids` says: the one tokenization of a prompt, `generate`'s and
        `mimo eval`'s. Special tokens are added as `adds_special_tokens` says, unless given."""
        if text.count(self.image_token) != images:
            raise PromptError(f"the prompt holds {text.count(self.image_token)} {self.image_token} placeholder(s) "
                              f"for {images} image(s); write one {IMAGE_TOKEN} where each image goes, or none "
                              f"(the image(s) then go before the text)")
        counts = [image_tokens] * images if isinstance(image_tokens, int) else list(image_tokens)
        if len(counts) != images:
            raise PromptError(f"{len(counts)} image token counts for {images} image(s)")
        special = self.adds_special_tokens(text) if add_special_tokens is None else add_special_tokens
        pieces = text.split(self.image_token)
        text = pieces[0] + "".join(self.image_token * n + piece for n, piece in zip(counts, pieces[1:], strict=True))
        text_id = self.image_token_id()
        ids = self.encode(text, special).ids
        return ids if model_image_id is None else [model_image_id if i == text_id else i for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Generated ids → text, special tokens skipped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def image_parts(text: str) -> list[dict[str, str]]:
    """Text with `<image>` placeholders as image and text parts (the newline after an image dropped: it is
    LLaVA's separator after the image, which the template writes itself)."""
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _content(value: Any) -> str | None:
    """A special token's text (tokenizer configs store a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The processor's chat template (chat_template.jinja / .json), else the tokenizer's."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = _json(directory / "chat_template.json").get("chat_template")
    template = template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A sandboxed Jinja template with the helpers chat templates expect (as transformers provides them)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask markers) rendered as their body;
        mimo's training data finds assistant tokens by rendering prefix by prefix (`mimo.data.templates`)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> list[Any]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
