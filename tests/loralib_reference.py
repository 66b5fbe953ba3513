"""The reference a loralib adapter is checked against: folded into the base weights by loralib itself
(`train(False)` with `merge_weights=True`), leaving plain `nn.Linear` layers."""

from __future__ import annotations

import torch
from torch import nn

from worker.loralib_backend import LoralibConfig, add_lora_layers


def merge_loralib_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], config: LoralibConfig
) -> nn.Module:
    """Fold a loralib adapter into `model`'s weights, in place, leaving plain `nn.Linear` layers."""
    names = add_lora_layers(model, config, merge_weights=True)
    load_lora_weights(model, state_dict)
    for name in names:
        layer = model.get_submodule(name)
        layer.train(False)  # loralib adds B·A·alpha/r to the weight when a layer leaves training mode
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        model.set_submodule(name, plain)
    return model


def load_lora_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Step two of loralib's two-step load, `load_state_dict(..., strict=False)`, refusing a state dict that
    leaves a LoRA weight unset or names a parameter the model lacks."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unset := [name for name in missing if "lora_" in name]:
        raise ValueError(
            f"The loralib state dict lacks {len(unset)} LoRA weights of the model, e.g. {unset[0]}"
        )
    if unexpected:
        raise ValueError(
            f"The loralib state dict holds {len(unexpected)} weights the model lacks, e.g. {unexpected[0]}"
        )
