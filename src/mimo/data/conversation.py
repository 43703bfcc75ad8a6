"""One data-file entry → a normalized conversation: system / user / assistant turns and the images they show.

Three forms are read. LLaVA's (`LLaVA-Pretrain`, `LLaVA-Instruct-665K`): `{"conversations": [{"from": "human" |
"gpt" | "system", "value": ...}], "image": "a.jpg" | ["a.jpg", "b.jpg"]}`, no "image" for a text-only sample,
`<image>` anywhere in a human turn. The `messages` form: `{"messages": [{"role": "user" | "assistant" | "system",
"content": str | [{"type": "image"}, {"type": "text", "text": ...}]}], "images": [...]}`, where an image part
becomes `<image>` followed by a newline when text follows it (LLaVA's own layout, so both forms normalize
alike). Either key, "image" or "images", names the images in the order of their `<image>` placeholders.
A malformed entry is a `ConversationError` saying what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """An entry that is not a conversation mimo can train on."""


@dataclass(frozen=True)
class Turn:
    """One turn: its role (system, user or assistant) and its text, `<image>` where each image sits."""

    role: str
    text: str


@dataclass(frozen=True)
class Conversation:
    """An optional system turn, then user and assistant turns alternating (ending with the assistant), and the
    image files (relative to the image folder) in the order of the `<image>` placeholders."""

    turns: tuple[Turn, ...]
    images: tuple[str, ...] = ()

    @property
    def system(self) -> str | None:
        """The system turn's text, if the conversation has one."""
        return self.turns[0].text if self.turns[0].role == "system" else None

    @property
    def dialogue(self) -> tuple[Turn, ...]:
        """The user and assistant turns, without the system turn."""
        return self.turns[1:] if self.system is not None else self.turns


def parse_entry(entry: Any) -> Conversation:
    """The conversation of one data-file entry, in any of the three forms; else a ConversationError."""
    if not isinstance(entry, dict):
        raise ConversationError(f"an entry must be a JSON object, got {type(entry).__name__}")
    if "conversations" in entry:
        turns = [_llava_turn(t, i) for i, t in enumerate(_list(entry["conversations"], "conversations"))]
    elif "messages" in entry:
        turns = [_message_turn(m, i) for i, m in enumerate(_list(entry["messages"], "messages"))]
    else:
        raise ConversationError("the entry has neither 'conversations' (LLaVA) nor 'messages'")
    conversation = Conversation(tuple(turns), _images(entry))
    _check(conversation)
    return conversation


def _list(value: Any, key: str) -> list[Any]:
    """`value` if it is a non-empty list, else an error naming `key`."""
    if not isinstance(value, list) or not value:
        raise ConversationError(f"'{key}' must be a non-empty list")
    return value


def _llava_turn(turn: Any, i: int) -> Turn:
    """A LLaVA `{"from", "value"}` turn."""
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise ConversationError(f"conversations[{i}] must be an object with a string 'value'")
    role = ROLES.get(turn.get("from"))
    if role is None:
        raise ConversationError(f"conversations[{i}] is from {turn.get('from')!r}; expected one of {list(ROLES)}")
    return Turn(role, turn["value"])


def _message_turn(message: Any, i: int) -> Turn:
    """A `{"role", "content"}` message, its content a string or a list of image and text parts."""
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise ConversationError(f"messages[{i}] must be an object with role system, user or assistant")
    content = message.get("content")
    if isinstance(content, str):
        return Turn(message["role"], content)
    if not isinstance(content, list):
        raise ConversationError(f"messages[{i}].content must be a string or a list of parts")
    return Turn(message["role"], _join_parts(content, i))


def _join_parts(parts: list[Any], i: int) -> str:
    """Image and text parts as one text: `<image>`, plus a newline when text follows it."""
    pieces = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE)
        elif kind == "text" and isinstance(part.get("text"), str):
            if pieces and pieces[-1] == IMAGE:
                pieces.append("\n")
            pieces.append(part["text"])
        else:
            raise ConversationError(f"messages[{i}].content[{j}] must be {{'type': 'image'}} or "
                                    f"{{'type': 'text', 'text': str}}")
    return "".join(pieces)


def _images(entry: dict[str, Any]) -> tuple[str, ...]:
    """The entry's image files: "image" or "images", a string or a list of strings, absent for none."""
    if "image" in entry and "images" in entry:
        raise ConversationError("the entry has both 'image' and 'images'; give one")
    value = entry.get("image", entry.get("images"))
    if value is None:
        return ()
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ConversationError(f"'image' must be a file name or a list of them, got {value!r}")
    return tuple(files)


def _check(conversation: Conversation) -> None:
    """An optional system turn first, then user / assistant alternating, ending with the assistant; one
    `<image>` per image, in user turns only."""
    roles = [t.role for t in conversation.dialogue]
    expected = ["user", "assistant"] * (len(roles) // 2)
    if not roles or roles != expected:
        raise ConversationError(f"turns must alternate user, assistant (after an optional system turn) and end "
                                f"with the assistant; got {[t.role for t in conversation.turns]}")
    misplaced = [t.role for t in conversation.turns if t.role != "user" and IMAGE in t.text]
    if misplaced:
        raise ConversationError(f"{IMAGE} appears in a {misplaced[0]} turn; images belong in user turns")
    placeholders = sum(t.text.count(IMAGE) for t in conversation.turns)
    if placeholders != len(conversation.images):
        raise ConversationError(f"the text holds {placeholders} {IMAGE} placeholder(s) for "
                                f"{len(conversation.images)} image(s)")
