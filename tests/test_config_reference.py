"""docs/config.md is what tools/config_reference.py generates from the config dataclasses, and every key has a
description next to its field: the reference stays true as keys are added or changed."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "config_reference.py"


def _tool():
    spec = importlib.util.spec_from_file_location("config_reference", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass looks its module up by name
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_every_key_has_a_description():
    assert _tool().missing() == []


def test_docs_config_md_is_current():
    tool = _tool()
    assert tool.OUTPUT.read_text() == tool.render(), "docs/config.md is stale: run python tools/config_reference.py"


def test_every_section_and_key_is_in_the_reference():
    from mimo.families.registry import FAMILIES
    from mimo.training.run_config import DISTRIBUTED_KEYS, SECTIONS

    text = _tool().render()
    for name in SECTIONS:
        assert f"## `{name}" in text
    keys = [k for f in FAMILIES.values() for k in (x.name for x in dataclasses.fields(f.section))]
    keys += list(DISTRIBUTED_KEYS)
    for key in keys:
        assert f"| `{key}` |" in text
