"""Model families: one folder each (`llava/`, `builtin/`), each a `ModelFamily` entry (`family.py`) named by one line
of `registry.py`. This package imports nothing, so a family's modules import `family.py` without a cycle."""
