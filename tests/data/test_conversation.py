"""Data-file entries → one normalized conversation: LLaVA-Pretrain, LLaVA-Instruct-665K and the messages form."""

from __future__ import annotations

import pytest

from mimo.data.conversation import Conversation, ConversationError, Turn, parse_entry


def test_llava_pretrain_caption():
    entry = {"id": "004539375", "image": "00453/004539375.jpg",
             "conversations": [{"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                               {"from": "gpt", "value": "select luxury furniture"}]}
    assert parse_entry(entry) == Conversation(
        (Turn("user", "Render a clear and concise summary of the photo.\n<image>"),
         Turn("assistant", "select luxury furniture")), ("00453/004539375.jpg",))


def test_llava_instruct_multi_turn_text_only_and_several_images():
    multi = {"image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]}
    conversation = parse_entry(multi)
    assert [t.role for t in conversation.turns] == ["user", "assistant", "user", "assistant"]
    assert conversation.images == ("coco/1.jpg",)
    text_only = {"id": "sharegpt", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert parse_entry(text_only).images == ()
    two = {"image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "compare <image> with <image> please"}, {"from": "gpt", "value": "same"}]}
    conversation = parse_entry(two)
    assert conversation.system == "be brief" and conversation.images == ("a.jpg", "b.jpg")
    assert conversation.dialogue[0].text == "compare <image> with <image> please"


def test_messages_form_with_image_parts_normalizes_like_llava():
    entry = {"images": ["a.png"], "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": "and now"}, {"role": "assistant", "content": "a dog"}]}
    assert parse_entry(entry) == Conversation(
        (Turn("system", "be brief"), Turn("user", "<image>\nwhat is it"), Turn("assistant", "a cat"),
         Turn("user", "and now"), Turn("assistant", "a dog")), ("a.png",))


@pytest.mark.parametrize(("entry", "message"), [
    (["not", "an", "object"], "an entry must be a JSON object, got list"),
    ({"id": 1}, "neither 'conversations' \\(LLaVA\\) nor 'messages'"),
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations\\[0\\] is from 'bot'"),
    ({"conversations": [{"from": "human", "value": 3}]}, "conversations\\[0\\] must be an object with a string"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
     "turns must alternate user, assistant"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "end with the assistant"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "no image here"},
                                          {"from": "gpt", "value": "x"}]},
     "0 <image> placeholder\\(s\\) for 1 image\\(s\\)"),
    ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
     "1 <image> placeholder\\(s\\) for 0 image\\(s\\)"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}]},
     "<image> appears in a assistant turn"),
    ({"image": 5, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
     "'image' must be a file name or a list"),
    ({"image": "a", "images": ["a"], "conversations": [{"from": "human", "value": "<image>"},
                                                          {"from": "gpt", "value": "x"}]},
     "both 'image' and 'images'"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages\\[0\\].content\\[0\\] must be"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages\\[0\\] must be an object with role"),
])
def test_malformed_entries_say_what_is_wrong(entry, message):
    with pytest.raises(ConversationError, match=message):
        parse_entry(entry)
