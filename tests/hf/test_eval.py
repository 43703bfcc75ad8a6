"""`mimo eval`: a held-out file's questions answered in padded batches with the KV cache, each answer the one
`mimo generate` prints for that question (images anywhere, several a question), written as JSONL and scored.

A tiny random LLaVA with a word-level tokenizer and a chat template that reads image parts; every generated word
is one token, so equal text is equal tokens.
"""

from __future__ import annotations

import json

import pytest

from mimo.cli import main
from tests.data.llava_files import save_entries, save_image
from tests.hf import tiny_hf

# the user's turn, its images in order, then "ASSISTANT:"; an answer and </s> after it (prefix-stable)
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for item in m['content'] %}"
        "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %} "
        "{% else %}ASSISTANT: {% for item in m['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QUESTIONS = [("<image>\ndescribe the image", ["a.png"]),
             ("describe <image> the <image> image please", ["a.png", "b.png"]),
             ("the image <image>", ["c.png"]),
             (" ".join(["describe the image please"] * 6) + " <image>", ["b.png"])]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny CLIP + Llama LLaVA directory with its processor and chat template, and three photos."""
    directory = tmp_path_factory.mktemp("served")
    tiny_hf.save_llava(directory)
    tiny_hf.processor(chat_template=CHAT).save_pretrained(directory)
    for k, name in enumerate(("a.png", "b.png", "c.png")):
        save_image(directory / "images" / name, width=9 + k, height=8 + 2 * k, seed=k)
    return directory


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _entry(text: str, images: list[str], reference: str) -> dict:
    return {"id": f"q{len(text)}", "image": images,
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": reference}]}


def test_mimo_eval_answers_each_question_as_mimo_generate_does(served, tmp_path, capsys):
    generated = []
    for text, images in QUESTIONS:
        code, out, err = _run(capsys, "generate", "--hf", str(served), "--prompt", text, "--max-new-tokens", "8",
                              *[a for name in images for a in ("--image", str(served / "images" / name))])
        assert code == 0, err
        generated.append(out.strip())
    assert len(set(generated)) > 1  # the questions get different answers: none is confused with another
    references = [f"  {generated[0].upper()} ", "please", "the image", "describe"]
    entries = [_entry(text, images, ref) for (text, images), ref in zip(QUESTIONS, references, strict=True)]
    entries.append({"conversations": [{"from": "human", "value": "describe please"},
                                      {"from": "gpt", "value": "please"}]})  # text only: answered too
    entries.append(_entry("<image>\nthe image", ["missing.png"], "x"))  # left out, named
    data, out = save_entries(tmp_path / "held_out.json", entries), tmp_path / "answers.jsonl"
    code, printed, err = _run(capsys, "eval", "--hf", str(served), "--data", str(data), "--image-folder",
                              str(served / "images"), "--out", str(out), "--max-new-tokens", "8",
                              "--batch-size", "3", "--device", "cpu")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in records[:4]] == generated  # batched, padded, cached: generate's answers
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    assert records[1] == {"index": 1, "id": entries[1]["id"], "question": QUESTIONS[1][0], "reference": "please",
                          "answer": generated[1]}
    assert printed.startswith("exact match 20.0%, token accuracy ") and "(5 questions of " in printed
    assert "1 skipped, the first: image file not found" in printed and f"answers in {out}" in printed


def test_mimo_eval_bad_input_is_one_line(served, tmp_path, capsys):
    code, _, err = _run(capsys, "eval", "--hf", str(served), "--data", str(tmp_path / "none.json"))
    assert code == 2 and err.count("\n") == 1 and "--data: " in err and "is not a file" in err
    code, _, err = _run(capsys, "eval", "--data", str(tmp_path / "none.json"))
    assert code == 2 and "give a checkpoint directory or --hf DIR" in err
    data = save_entries(tmp_path / "bad.json", [_entry("<image>\nthe image", ["missing.png"], "x")])
    code, _, err = _run(capsys, "eval", "--hf", str(served), "--data", str(data), "--out", str(tmp_path / "a.jsonl"))
    assert code == 2 and err.count("\n") == 1
    assert "no question of the held-out data could be asked; the first: image file not found" in err
