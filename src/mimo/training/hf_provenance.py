"""Where a checkpoint's left-out parts come from: frozen parts read from Hugging Face directories (`HFPart`), which a
checkpoint leaves out unless `checkpoint.save_frozen_hf_weights`, recorded in `mimo.json` (`weights_from_hf`) with
their key prefix, setting, directory and `mimo.hf.load.fingerprint`; every load checks them against its own run's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimo.training.checkpoint_files import INFO, CheckpointError, read_json, weights_path

HF_WEIGHTS = "weights_from_hf"  # mimo.json's key for the parts left out: {name: where their weights come from}


@dataclass(frozen=True)
class HFPart:
    """A part of a run's model whose weights the run reads from a Hugging Face directory (`plan.hf_parts`).

    `name`: vision_encoder, projector or language_model; `prefix`: its parameters' keys; `setting`: the config key
    naming `directory`; `fingerprint`: `mimo.hf.load.fingerprint` of it; `omitted`: the run's checkpoints leave
    it out (it is frozen and `checkpoint.save_frozen_hf_weights` is false).
    """

    name: str
    prefix: str
    setting: str
    directory: str
    fingerprint: dict[str, Any]
    omitted: bool

    def record(self) -> dict[str, Any]:
        """What a checkpoint that leaves this part out says about it in `mimo.json`."""
        return {"prefix": self.prefix, "setting": self.setting, "directory": self.directory,
                "fingerprint": self.fingerprint}


def left_out_records(hf_parts: Sequence[HFPart]) -> dict[str, dict[str, Any]]:
    """`mimo.json`'s `weights_from_hf` for a save: each omitted part's record, by name."""
    return {p.name: p.record() for p in hf_parts if p.omitted}


def check_hf_records(path: Path, records: Any) -> None:
    """Each part left out is recorded with its key prefix, setting, directory and fingerprint."""
    fields = ("prefix", "setting", "directory", "fingerprint")
    if not isinstance(records, dict) or not all(isinstance(r, dict) and all(f in r for f in fields)
                                                for r in records.values()):
        raise CheckpointError(f"checkpoint {path} has a corrupt {INFO}: {HF_WEIGHTS} must map each part left out "
                              f"to its {', '.join(fields)}")


def parts_left_out(path: str | Path) -> set[str]:
    """The parts a checkpoint (or a run directory: its newest) leaves out, by name, from its `mimo.json` alone;
    none if it cannot be read (whatever loads it refuses it then, naming why)."""
    try:
        return set(read_json(weights_path(path) / INFO).get(HF_WEIGHTS, {}))
    except CheckpointError:
        return set()


def omitted_prefixes(path: Path, info: dict, hf_parts: Sequence[HFPart]) -> tuple[str, ...]:
    """The key prefixes of the parts checkpoint `path` (its `info`) leaves out, each checked to come from a
    Hugging Face directory of this run (`hf_parts`) with the fingerprint recorded; else a one-line
    `CheckpointError` naming the part, the directory recorded, the one configured and what to do."""
    from mimo.hf.load import fingerprint_difference

    ours = {p.name: p for p in hf_parts}
    for name, recorded in info[HF_WEIGHTS].items():
        part, was = ours.get(name), recorded["directory"]
        if part is None:
            raise CheckpointError(f"checkpoint {path} leaves out the frozen {name}, whose weights come from the "
                                  f"Hugging Face directory {was} ({recorded['setting']}), but this run reads "
                                  f"{name} from no Hugging Face directory: set {recorded['setting']} to {was} "
                                  f"(or to a copy of it)")
        difference = ("it does not exist" if not Path(part.directory).is_dir() else
                      fingerprint_difference(recorded["fingerprint"], part.fingerprint))
        if difference:
            raise CheckpointError(f"checkpoint {path} leaves out the frozen {name}, whose weights come from the "
                                  f"Hugging Face directory {was}, but this run's {part.setting} {part.directory} "
                                  f"is not that directory ({difference}): set {recorded['setting']} to {was} or "
                                  f"to an unchanged copy of it (--set {recorded['setting']}=PATH)")
    return tuple(recorded["prefix"] for recorded in info[HF_WEIGHTS].values())
