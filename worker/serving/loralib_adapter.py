"""loralib adapters (`worker.loralib_backend`) read into the per-row LoRA form that `MultiLora` applies.

A `lora.Linear` is plain LoRA in PEFT's layout: `delta(x) = x A^T B^T * lora_alpha / r`. A `lora.MergedLinear`
over the fused qkv_proj gives each enabled slice a rank-r LoRA of its own: its A stacks the slices' A
matrices ([r * k, in] for k enabled slices), its B stacks their B matrices ([width * k, r]), and its forward
adds `zero_pad(conv1d(A, B, groups=k)) * lora_alpha / r`, where group g multiplies the g-th r rows of A by
the g-th `width` rows of B and `zero_pad` places the result in the output rows of the g-th enabled slice.
That is exactly one LoRA of rank r * k whose B is block-structured: slice g's B in its output rows and in
the g-th r columns, zeros elsewhere. The scaling stays lora_alpha / r.

MergedLinear cuts the output into equal slices (`out_features // len(enable_lora)`), whatever the model's
real q, k and v widths; the layout here follows it, so the served adapter computes what was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.adapter_archive import LORALIB_CONFIG_FILE, LORALIB_STATE_DICT_FILE, InvalidAdapter
from worker.loralib_backend import LoralibConfig
from worker.serving.lora import (
    LORA_DTYPE,
    AdapterWeights,
    LoraModule,
    checked_alpha,
    checked_rank,
    read_tensors,
)

MERGED_LAYER = "qkv_proj"  # the layer the backend adapts with lora.MergedLinear


def read_loralib_adapter(
    directory: Path, linear_shapes: dict[str, tuple[int, int]], device: torch.device
) -> AdapterWeights:
    """Read and check a loralib adapter (loralib_config.json + lora_state_dict.safetensors) for a base model
    whose linear layers have `linear_shapes` ({name: (in_features, out_features)})."""
    config = _read_config(directory / LORALIB_CONFIG_FILE)
    weights_path = directory / LORALIB_STATE_DICT_FILE
    if not weights_path.is_file():
        raise InvalidAdapter(f"the adapter has no {LORALIB_STATE_DICT_FILE}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(weights_path).items():
        name, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B"):
            raise InvalidAdapter(_unsupported_tensor(key))
        pairs.setdefault(name, {})[part] = tensor
    expected = {name for name in linear_shapes if _is_adapted(name, config)}
    modules = {}
    for name, pair in pairs.items():
        if name not in linear_shapes:
            raise InvalidAdapter(f"the base model has no linear layer {name}")
        if name not in expected:
            raise InvalidAdapter(
                f"layer {name} has LoRA weights but {LORALIB_CONFIG_FILE} does not target it"
            )
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidAdapter(f"layer {name} lacks lora_A or lora_B")
        a, b = _lora_matrices(name, pair["lora_A"], pair["lora_B"], linear_shapes[name], config)
        modules[name] = LoraModule(
            a.to(device, LORA_DTYPE), b.to(device, LORA_DTYPE), config.lora_alpha / config.r
        )
    # loralib's own load refuses a state dict that leaves a LoRA layer unset; so does this.
    if missing := sorted(expected - modules.keys()):
        raise InvalidAdapter(
            f"the state dict lacks the LoRA weights of {len(missing)} layers, e.g. {missing[0]}"
        )
    return AdapterWeights(modules)


def _read_config(path: Path) -> LoralibConfig:
    try:
        config = LoralibConfig.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidAdapter(f"unreadable {LORALIB_CONFIG_FILE}: {exc}") from exc
    checked_rank(config.r, LORALIB_CONFIG_FILE)
    checked_alpha(config.lora_alpha, LORALIB_CONFIG_FILE)
    for field, names in (("target_modules", config.target_modules), ("qkv_slices", config.qkv_slices or [])):
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise InvalidAdapter(f"{LORALIB_CONFIG_FILE}: {field} must be a list of names")
    return config


def _is_adapted(name: str, config: LoralibConfig) -> bool:
    """Whether the backend gave layer `name` LoRA weights: a targeted layer, qkv_proj only with slices."""
    short_name = name.rpartition(".")[2]
    if short_name not in config.target_modules:
        return False
    return short_name != MERGED_LAYER or any(config.enable_lora())


def _unsupported_tensor(key: str) -> str:
    if key.endswith("bias"):
        # A trained bias replaces the base layer's bias: no LoRA expresses that.
        return (
            f"the adapter trained biases ({key}), which the inference server cannot apply as LoRA; "
            "train with bias 'none' to serve it"
        )
    return f"unsupported tensor {key}: only lora_A and lora_B weights are served"


def _lora_matrices(
    name: str, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int], config: LoralibConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's LoRA as [rank, in] and [out, rank] matrices, with rank r, or r * k for a MergedLinear."""
    in_features, out_features = shape
    r = config.r
    if name.rpartition(".")[2] != MERGED_LAYER:
        _check_shapes(name, a, b, (r, in_features), (out_features, r))
        return a, b
    enable_lora = config.enable_lora()
    if out_features % len(enable_lora):
        raise InvalidAdapter(
            f"layer {name}: {out_features} outputs do not split into {len(enable_lora)} slices"
        )
    width = out_features // len(enable_lora)
    enabled = [index for index, on in enumerate(enable_lora) if on]
    _check_shapes(name, a, b, (r * len(enabled), in_features), (width * len(enabled), r))
    block_b = b.new_zeros(out_features, r * len(enabled))
    for group, index in enumerate(enabled):
        block_b[index * width : (index + 1) * width, group * r : (group + 1) * r] = b[
            group * width : (group + 1) * width
        ]
    return a, block_b


def _check_shapes(
    name: str, a: torch.Tensor, b: torch.Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]
) -> None:
    if a.shape != a_shape or b.shape != b_shape:
        raise InvalidAdapter(
            f"layer {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
            f"{LORALIB_CONFIG_FILE} over this base model (expected {a_shape} and {b_shape})"
        )
