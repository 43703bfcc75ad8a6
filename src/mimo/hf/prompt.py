"""Text → token ids as transformers' `LlavaProcessor` makes them, with the `tokenizers` runtime (tokenizer.json).

With a chat template the prompt is one user turn holding the image and the text, rendered with
`add_generation_prompt` in a sandboxed Jinja environment set up as transformers sets it up (jinja2 is
what transformers itself uses; mimo imports it only here); without one the text is `<image>\\n` + prompt.
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
    def from_directory(cls, directory: str | Path) -> Prompter:
        """Read tokenizer.json, tokenizer_config.json and the processor's chat template (if any), and give the
        tokenizer its image token if it has none (`add_image_token`): every user of a prompter reads images."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise PromptError(f"{directory}: no tokenizer.json (the fast tokenizer file mimo runs)")
        config = _json(directory / "tokenizer_config.json")
        specials = {k: _content(v) for k, v in {**_json(directory / "special_tokens_map.json"), **config}.items()
                    if k.endswith("_token") and _content(v) is not None}
        processor = _json(directory / "processor_config.json")
        image_token = processor.get("image_token", config.get("image_token", IMAGE_TOKEN))
        prompter = cls(Tokenizer.from_file(str(directory / "tokenizer.json")), specials,
                       _chat_template(directory, config), image_token)
        prompter.add_image_token()
        return prompter

    def text(self, prompt: str) -> str:
        """The text before image expansion: the chat template's rendering, or `<image>\\n` + prompt."""
        if self.chat_template is None:
            return f"{self.image_token}\n{prompt}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.render(messages, add_generation_prompt=True)

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

    def input_ids(self, prompt: str, image_tokens: int, model_image_id: int | None = None) -> list[int]:
        """Token ids of the prompt with its one image expanded to `image_tokens` image tokens, written as
        `model_image_id` if given (a model trained from a tower and a language model has its own image id)."""
        text = self.text(prompt)
        if text.count(self.image_token) != 1:
            raise PromptError(f"the prompt holds {text.count(self.image_token)} {self.image_token} tokens; "
                              f"mimo generate takes one image")
        text = text.replace(self.image_token, self.image_token * image_tokens)
        text_id = self.image_token_id()
        ids = self.encode(text, self.adds_special_tokens(text)).ids
        return ids if model_image_id is None else [model_image_id if i == text_id else i for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Generated ids → text, special tokens skipped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


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
