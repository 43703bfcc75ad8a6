"""A Qwen2.5-VL or Qwen3-VL `vision_config` → mimo's tower config, strictly (and back, for export).

Each key is read into the config, required to have a value mimo implements, or known not to change the tower's
numbers; any other key or value is an `HFConfigError` naming it (`mimo.hf.config.Keys`). A key a config leaves
out takes transformers' class default, as `from_pretrained` would. Keys as the hub's directories write them are
accepted beside transformers 5's: `in_chans` (Qwen2.5-VL's original name of `in_channels`), `spatial_patch_size`
(equal to `patch_size`), `num_attention_heads` / `num_hidden_layers` (the attribute-map aliases).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from mimo.hf.config import HFConfigError, Keys
from mimo.models.encoder_block import ACTIVATIONS
from mimo.models.qwen_vision import Qwen3VisionConfig, Qwen25VisionConfig, QwenVisionConfig

# transformers 5's class defaults (Qwen2_5_VLVisionConfig, Qwen3VLVisionConfig): what an absent key means
QWEN25_DEFAULTS: dict[str, Any] = {
    "depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
    "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]}
QWEN3_DEFAULTS: dict[str, Any] = {
    "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
    "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "out_hidden_size": 3584, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}
MODEL_TYPES = {"qwen2_5_vl": ("qwen2_5_vl_vision", "qwen2_5_vl"), "qwen3_vl": ("qwen3_vl_vision", "qwen3_vl")}
ALIASES = {"in_chans": "in_channels", "num_attention_heads": "num_heads", "num_hidden_layers": "depth"}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _layer_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _merged_aliases(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The config with alias keys folded into their names; an alias disagreeing with its name is refused."""
    data = dict(hf)
    for alias, name in ALIASES.items():
        if alias in data:
            value = data.pop(alias)
            if name in data and data[name] != value:
                raise HFConfigError(f"{where}: {alias}={value!r} disagrees with {name}={data[name]!r}")
            data[name] = value
    if "spatial_patch_size" in data:
        value = data.pop("spatial_patch_size")
        if data.get("patch_size", value) != value:
            raise HFConfigError(f"{where}: spatial_patch_size={value!r} differs from patch_size="
                                f"{data['patch_size']!r}; mimo implements square patches of one size")
        data["patch_size"] = value
    return data


def _rope_theta(keys: Keys) -> float:
    """The ViT's 2-D rotary base: `rope_parameters` of rope_type 'axial' (transformers 5), else 10000."""
    params = dict(keys.get("rope_parameters") or {})
    kind = params.pop("rope_type", params.pop("type", "axial"))
    theta = params.pop("rope_theta", keys.get("rope_theta", 10000.0))
    if kind not in ("axial", "default") or params:
        raise HFConfigError(f"{keys.where}: rope_parameters={keys.data.get('rope_parameters')!r} is not supported "
                            f"by mimo; it implements the 2-D axial rotary (rope_type 'axial', rope_theta only)")
    return float(theta)


def _shared(keys: Keys) -> dict[str, Any]:
    """The fields both towers read."""
    out = {name: keys.require(name, _positive_int, None, "a positive integer")
           for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                        "spatial_merge_size", "temporal_patch_size", "out_hidden_size")}
    out["hidden_act"] = keys.require("hidden_act", lambda v: v in ACTIVATIONS, None,
                                     f"hidden_act in {sorted(ACTIVATIONS)}")
    out["rope_theta"] = _rope_theta(keys)
    keys.require("attention_dropout", lambda v: v in (0, 0.0, None), 0.0, "no dropout (attention_dropout 0)")
    return out


def _keys(hf: Mapping[str, Any], family: str, defaults: Mapping[str, Any], where: str) -> Keys:
    """The config read strictly, its model_type checked, absent keys at transformers' defaults."""
    model_type = hf.get("model_type", MODEL_TYPES[family][0])
    if model_type not in MODEL_TYPES[family]:
        raise HFConfigError(f"{where}: model_type={model_type!r} is not a {family} vision tower; expected one of "
                            f"{list(MODEL_TYPES[family])}")
    return Keys({**defaults, **_merged_aliases(hf, where)}, where)


def _build(cls: type[QwenVisionConfig], values: dict[str, Any], where: str) -> Any:
    """The config dataclass, its own checks (heads, layer indexes) reported as config errors."""
    try:
        return cls(**values)
    except ValueError as e:
        raise HFConfigError(f"{where}: {e}") from None


def qwen25_vision_config(hf: Mapping[str, Any], where: str = "vision_config") -> Qwen25VisionConfig:
    """A Qwen2.5-VL `vision_config` as a `Qwen25VisionConfig`."""
    keys = _keys(hf, "qwen2_5_vl", QWEN25_DEFAULTS, where)
    values = _shared(keys)
    values["window_size"] = keys.require("window_size", _positive_int, None, "a positive integer")
    values["fullatt_block_indexes"] = tuple(keys.require("fullatt_block_indexes", _layer_list, None,
                                                         "a list of layer indexes"))
    keys.get("tokens_per_second")  # videos' temporal M-RoPE step: the language model's positions, not the tower's
    keys.done()
    return _build(Qwen25VisionConfig, values, where)


def qwen3_vision_config(hf: Mapping[str, Any], where: str = "vision_config") -> Qwen3VisionConfig:
    """A Qwen3-VL `vision_config` as a `Qwen3VisionConfig`."""
    keys = _keys(hf, "qwen3_vl", QWEN3_DEFAULTS, where)
    values = _shared(keys)
    values["num_position_embeddings"] = keys.require("num_position_embeddings", _positive_int, None,
                                                     "a positive integer (a square grid)")
    values["deepstack_visual_indexes"] = tuple(keys.require("deepstack_visual_indexes", _layer_list, None,
                                                            "a list of layer indexes"))
    keys.done()
    return _build(Qwen3VisionConfig, values, where)


def qwen_vision_to_hf(config: QwenVisionConfig) -> dict[str, Any]:
    """The `vision_config` transformers 5 writes for this tower (export)."""
    qwen3 = isinstance(config, Qwen3VisionConfig)
    out: dict[str, Any] = {"model_type": "qwen3_vl_vision" if qwen3 else "qwen2_5_vl_vision"}
    for field in fields(config):
        value = getattr(config, field.name)
        if field.name != "rope_theta":
            out[field.name] = list(value) if isinstance(value, tuple) else value
    out["rope_parameters"] = {"rope_type": "axial", "rope_theta": config.rope_theta}
    return out
