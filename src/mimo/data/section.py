"""The run config's `data` section: which dataset a run reads and how (checked when the YAML is parsed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mimo.config import RunConfigError


@dataclass
class DataSection:
    """`llava`: a LLaVA-format file (JSON array or JSONL; LLaVA's `conversations` or the `messages` form) and
    its image folder; `digits` (built in: scikit-learn's 8×8 scans, captioned, written once as PNGs and LLaVA
    JSON to ~/.cache/mimo and read through the same dataset); `synthetic` (generated)."""

    name: Literal["digits", "synthetic", "llava"] = "digits"  # the dataset: built-in digits, generated, or a file
    num_samples: int = field(default=4096, metadata={"min": 1})  # synthetic: the samples the generated set holds
    # synthetic: each sample's item count per modality, drawn from these choices
    items_per_sample: list[int] = field(default_factory=lambda: [0, 1, 3], metadata={"min": 0})
    path: str | None = None  # llava: the JSON / JSONL file
    image_folder: str | None = None  # llava: the directory the entries' image paths are relative to
    # llava: how conversations become tokens: chat = the tokenizer's chat template; plain (LLaVA stage 1);
    # vicuna_v1 (LLaVA-1.5)
    template: Literal["chat", "plain", "vicuna_v1"] = "chat"
    # llava: default the language model's; a longer sample is dropped (a bad sample), never cut
    max_seq_len: int | None = field(default=None, metadata={"min": 1})
    # a missing / corrupt image, malformed conversation or too-long sample: skip (the next good sample takes its
    # place, counted) or error (the run stops, naming it)
    on_bad_sample: Literal["skip", "error"] = "skip"
    # llava: the most of the file's rows that may be bad (malformed, an image missing, too long: all rows are checked
    # before launch); above it the run is refused, naming them; with on_bad_sample error, any bad row is refused
    max_bad_sample_rate: float = field(default=0.01, metadata={"min": 0, "max": 1})
    tokenizer: str | None = None  # llava: a directory with tokenizer.json; default model.hf / model.language_hf
    # llava: the most of the first samples' tokens that may be the tokenizer's <unk> (checked before launch;
    # above it the run is refused, naming words the tokenizer lacks; 1 trains whatever the share)
    max_unknown_token_rate: float = field(default=0.05, metadata={"min": 0, "max": 1})
    cache_samples: bool = False  # keep each prepared sample in memory after its first use (small datasets)
    # loader processes per rank; 0 builds batches in the training process; unset: min(8, CPUs per rank - 1)
    num_workers: int | None = field(default=None, metadata={"min": 0})
    prefetch_factor: int = field(default=2, metadata={"min": 1})  # global batches each worker keeps ready
    packing: bool = False  # each micro-batch's samples end to end in one row, attention kept per sample
    # llava: an image path that leaves image_folder (`../x`, `/etc/x`) is a bad sample, unless this is true
    allow_paths_outside_image_folder: bool = False
    # llava: an image with more pixels is a bad sample, skipped before it is decoded (a decompression bomb, a
    # 12000² scan decoded in full for a 336² input); null: no cap
    max_image_pixels: int | None = field(default=50_000_000, metadata={"min": 1})
    # llava, native-resolution images (model.family qwen_vl): the fewest pixels an image is resized to, overriding
    # the model directory's image processor's min_pixels; null: the directory's
    min_pixels: int | None = field(default=None, metadata={"min": 1})
    # llava, native-resolution images (model.family qwen_vl): the most pixels an image is resized to (its image
    # tokens: pixels / (patch x merge)^2), overriding the directory's max_pixels; null: the directory's
    max_pixels: int | None = field(default=None, metadata={"min": 1})
    # the longest a rank waits for one batch before the launcher names and ends it (a read that never returns)
    timeout_s: float = field(default=600.0, metadata={"above": 0})

    def __post_init__(self) -> None:
        """A llava dataset names its file and image folder; the built-in ones take none of its keys."""
        if None not in (self.min_pixels, self.max_pixels) and self.min_pixels > self.max_pixels:
            raise RunConfigError(f"data: min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}; give "
                                 f"min_pixels <= max_pixels")
        if self.name == "llava":
            missing = [k for k in ("path", "image_folder") if getattr(self, k) is None]
            if missing:
                raise RunConfigError(f"data: name 'llava' needs {' and '.join(f'data.{k}' for k in missing)} "
                                     f"(the LLaVA JSON / JSONL file and the folder its images are in)")
            return
        given = [k for k in ("path", "image_folder", "tokenizer", "min_pixels", "max_pixels")
                 if getattr(self, k) is not None]
        given += ["template"] if self.template != "chat" else []
        if given:
            raise RunConfigError(f"data: {', '.join(f'data.{k}' for k in given)} apply to name 'llava' only, and "
                                 f"name is {self.name!r} (which brings its own files, tokenizer and template)")
