"""Conversation → the text a model trains on, and the character spans whose tokens carry labels.

Three templates: the tokenizer's chat template (`chat`, the default), LLaVA's `plain` (stage-1 pretraining) and
LLaVA's `vicuna_v1` (LLaVA-1.5's instruction tuning). Each renders text with `<image>` placeholders and the
spans of the assistant turns (with their end token); the dataset tokenizes the whole text once and labels the
tokens inside those spans, so no template counts tokens itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mimo.data.conversation import IMAGE, Conversation, ConversationError, Turn
from mimo.hf.prompt import Prompter


class TemplateError(ValueError):
    """A template that cannot be used with this tokenizer."""


@dataclass(frozen=True)
class Rendered:
    """A conversation's text, the [start, end) character spans to learn, and whether the tokenizer should add
    its special tokens (BOS) when encoding it."""

    text: str
    targets: tuple[tuple[int, int], ...]
    add_special_tokens: bool = True

    @property
    def prompt(self) -> str:
        """The text before the first answer: what the model is asked (`generate`'s and a held-out question's)."""
        return self.text[:self.targets[0][0]]


class PlainTemplate:
    """LLaVA's `plain` (`preprocess_plain`, stage 1): the human turn is replaced by its images alone, then the
    caption and "\\n" (conv_llava_plain's separator; LLaVA adds no EOS); labels on the caption and that
    newline. The entry must be one human turn with an image and one gpt turn."""

    name = "plain"
    SEPARATOR = "\n"

    def render(self, conversation: Conversation) -> Rendered:
        """`<image>…` + caption + "\\n", learning the caption and the newline."""
        turns = conversation.turns
        if len(turns) != 2 or turns[0].role != "user" or IMAGE not in turns[0].text:
            raise ConversationError("the plain template takes one user turn with an image and one assistant turn "
                                    "(LLaVA-Pretrain's caption form)")
        prefix = IMAGE * turns[0].text.count(IMAGE)
        text = prefix + turns[1].text + self.SEPARATOR
        return Rendered(text, ((len(prefix), len(text)),))

    def render_text(self, conversation: Conversation) -> Rendered:
        """The rendering alone (its spans come free here)."""
        return self.render(conversation)


class VicunaV1Template:
    """LLaVA's `vicuna_v1` (conv_vicuna_v1, `preprocess_v1`): "SYSTEM USER: q ASSISTANT: a</s>USER: …", the
    system prompt LLaVA's unless the entry has one, `</s>` being the tokenizer's EOS token; labels on each
    answer and its EOS. Images stay where the entry puts them (LLaVA moves a single image to the front)."""

    name = "vicuna_v1"
    SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    ROLES = {"user": "USER", "assistant": "ASSISTANT"}

    def __init__(self, eos_token: str = "</s>") -> None:
        """`eos_token` closes each answer (LLaVA's sep2)."""
        self.eos_token = eos_token

    def render(self, conversation: Conversation) -> Rendered:
        """The conversation in Vicuna v1's separators, learning every answer and its EOS."""
        system = conversation.system if conversation.system is not None else self.SYSTEM
        text, targets = system + " ", []
        for turn in conversation.dialogue:
            text += self.ROLES[turn.role] + ": "
            if turn.role == "user":
                text += turn.text + " "
            else:
                start = len(text)
                text += turn.text + self.eos_token
                targets.append((start, len(text)))
        return Rendered(text, tuple(targets))

    def render_text(self, conversation: Conversation) -> Rendered:
        """The rendering alone (its spans come free here)."""
        return self.render(conversation)


class ChatTemplate:
    """The tokenizer's chat template (jinja, sandboxed as transformers runs it: `Prompter.render`).

    Assistant spans come from rendering prefix by prefix: for assistant turn i, the rendering of the turns
    before it with `add_generation_prompt=True` must be a prefix of the rendering through turn i, and that of
    the whole conversation; the difference is the answer plus the template's end of turn (e.g. `<|im_end|>\\n`),
    which is what the loss learns. (`{% generation %}` markers are rendered as their body, not used: few
    templates have them; a test checks the spans equal transformers' assistant mask where they do.) A
    template whose earlier output changes with later turns is refused, on a probe conversation when the
    template is built. Each turn becomes a message as `Prompter.message` says (generation's rule too)."""

    name = "chat"

    def __init__(self, prompter: Prompter) -> None:
        """Check that the tokenizer has a chat template that renders a probe conversation prefix-stably."""
        if prompter.chat_template is None:
            raise TemplateError("the 'chat' template needs the tokenizer's chat template, and this tokenizer has "
                                "none; use data.template plain or vicuna_v1, or a tokenizer with a chat template")
        self.prompter = prompter
        probe = Conversation((Turn("user", "hello"), Turn("assistant", "hi"), Turn("user", "how are you?"),
                              Turn("assistant", "fine")))
        try:
            self.render(probe)
        except ConversationError as e:
            raise TemplateError(f"the tokenizer's chat template cannot be used for training: {e}") from None

    def render(self, conversation: Conversation) -> Rendered:
        """The whole conversation's rendering and the span of each assistant turn (see the class docstring)."""
        messages = [self.prompter.message(t.role, t.text) for t in conversation.turns]
        whole = self.prompter.render(messages)
        targets = []
        for i, turn in enumerate(conversation.turns):
            if turn.role != "assistant":
                continue
            before = self.prompter.render(messages[:i], add_generation_prompt=True)
            through = whole if i + 1 == len(messages) else self.prompter.render(messages[:i + 1])
            if not (through.startswith(before) and whole.startswith(through)):
                prefix, text = (before, through) if not through.startswith(before) else (through, whole)
                raise ConversationError(f"the chat template's rendering of turns before {i} (with the generation "
                                        f"prompt) is not a prefix of the rendering through turn {i}, so the "
                                        f"assistant's tokens cannot be located: {_divergence(prefix, text)}; "
                                        f"data.template vicuna_v1 (LLaVA-1.5's conversations) or plain (captions) "
                                        f"need no chat template")
            targets.append((len(before), len(through)))
        return Rendered(whole, tuple(targets), self.prompter.adds_special_tokens(whole))

    def render_text(self, conversation: Conversation) -> Rendered:
        """The whole conversation's rendering without its spans (one rendering, not one per assistant turn): what
        a length check tokenizes."""
        messages = [self.prompter.message(t.role, t.text) for t in conversation.turns]
        whole = self.prompter.render(messages)
        return Rendered(whole, (), self.prompter.adds_special_tokens(whole))


def _divergence(prefix: str, text: str, context: int = 20) -> str:
    """Where a rendering that should be a prefix of another parts from it, and what each has there."""
    k = next((j for j, (a, b) in enumerate(zip(prefix, text, strict=False)) if a != b), min(len(prefix), len(text)))
    return f"they part at character {k}: {prefix[k:k + context]!r} against {text[k:k + context]!r}"


TEMPLATES: Sequence[str] = ("chat", "plain", "vicuna_v1")


def build_template(name: str, prompter: Prompter) -> ChatTemplate | PlainTemplate | VicunaV1Template:
    """The template called `name` for this tokenizer; an unknown name or a missing chat template is an error."""
    if name == "chat":
        return ChatTemplate(prompter)
    if name == "plain":
        return PlainTemplate()
    if name == "vicuna_v1":
        return VicunaV1Template(prompter.special_tokens.get("eos_token", "</s>"))
    raise TemplateError(f"unknown template {name!r}; templates are {list(TEMPLATES)}")
