"""The README's Hugging Face commands run as written: make a tiny LLaVA, train on TP2, export, generate."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The command lines of the README's 'Hugging Face models' code block."""
    section = (ROOT / "README.md").read_text().split("## Hugging Face models", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_hugging_face_commands(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    outputs = []
    for line in readme_commands():
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in shlex.split(line)]
        args = [sys.executable, "-m", "mimo", *args[1:]] if args[0] == "mimo" else [sys.executable, *args[1:]]
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    assert len(outputs) == 5
    exported, from_checkpoint = outputs[3].strip(), outputs[4].strip()
    assert exported == from_checkpoint and len(exported.split()) == 32  # the same model, 32 words by default
