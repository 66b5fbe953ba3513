"""The loralib backend: Microsoft's `loralib` layers swapped into Phi-3, saved as a LoRA-only state dict.

Phi-3 fuses its q, k and v projections into one `qkv_proj`. `lora.MergedLinear` gives each enabled slice of
it a LoRA of its own (`enable_lora`), so ["q", "v"] adapts the query and value projections only, as the
LoRA paper did; the other targeted projections get a `lora.Linear`. qkv_proj's layer is a
`LowRankMergedLinear` (`worker.loralib_layers`): a `lora.MergedLinear` whose forward goes through the rank
instead of rebuilding the dense ΔW on every call; its parameters, state dict and merge are loralib's own,
so its adapters load into plain loralib layers. The adapter is saved as `lora.lora_state_dict` in
safetensors, and also in PEFT's format when that is exact: when every layer is a plain `lora.Linear` and no
bias was trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import loralib as lora
import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from app.specs import PeftConfig
from worker.adapter_archive import (
    LORALIB_CONFIG_FILE,
    LORALIB_DIR,
    LORALIB_STATE_DICT_FILE,
    PEFT_UNAVAILABLE_FILE,
    PEFT_WEIGHTS_FILE,
)
from worker.loralib_layers import LowRankMergedLinear

ModuleT = TypeVar("ModuleT", bound=nn.Module)

QKV_ORDER = ("q", "k", "v")  # the order of the slices in Phi-3's fused qkv_proj


@dataclass(frozen=True)
class LoralibConfig:
    """What rebuilds the loralib layers of an adapter; saved next to its state dict."""

    r: int
    lora_alpha: float
    lora_dropout: float
    bias: str  # loralib's: "none", "all" or "lora_only"
    target_modules: list[str]
    qkv_slices: list[str] | None  # the slices of qkv_proj with a LoRA; None when qkv_proj is not adapted

    @classmethod
    def from_peft_config(cls, peft_config: PeftConfig) -> LoralibConfig:
        """The layers a job's PeftConfig asks for, "all-linear" and the default slices spelled out."""
        targets = peft_config.loralib_targets()
        return cls(
            r=peft_config.r,
            lora_alpha=peft_config.lora_alpha,
            lora_dropout=peft_config.lora_dropout,
            bias=peft_config.bias,
            target_modules=targets,
            qkv_slices=peft_config.enabled_qkv_slices() if "qkv_proj" in targets else None,
        )

    @classmethod
    def from_json(cls, text: str) -> LoralibConfig:
        """Read loralib_config.json."""
        return cls(**json.loads(text))

    def to_json(self) -> str:
        """The text of loralib_config.json."""
        return json.dumps(asdict(self), indent=2) + "\n"

    def enable_lora(self) -> list[bool]:
        """`lora.MergedLinear`'s enable_lora for qkv_proj: which of its q, k, v slices are adapted."""
        return [name in (self.qkv_slices or ()) for name in QKV_ORDER]


def add_lora_layers(model: nn.Module, config: LoralibConfig, *, merge_weights: bool = False) -> list[str]:
    """Swap the targeted `nn.Linear` layers of `model` for loralib layers holding the same weight and bias.

    Returns the names of the swapped layers. `merge_weights=False` keeps the LoRA update out of the weight
    in eval mode: merging and unmerging around every evaluation would round a bf16 base weight each time.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        short_name = name.rsplit(".", 1)[-1]
        if short_name in config.target_modules and type(module) is nn.Linear:
            model.set_submodule(name, _lora_layer(short_name, module, config, merge_weights))
            swapped.append(name)
    found = {name.rsplit(".", 1)[-1] for name in swapped}
    if missing := [target for target in config.target_modules if target not in found]:
        raise ValueError(f"peft_config.target_modules: the model has no nn.Linear named {', '.join(missing)}")
    return swapped


def _lora_layer(short_name: str, linear: nn.Linear, config: LoralibConfig, merge_weights: bool) -> nn.Linear:
    options = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "merge_weights": merge_weights,
        "bias": linear.bias is not None,
        "device": linear.weight.device,
        "dtype": linear.weight.dtype,
    }
    if short_name == "qkv_proj":
        layer = LowRankMergedLinear(
            linear.in_features, linear.out_features, enable_lora=config.enable_lora(), **options
        )
    else:
        layer = lora.Linear(linear.in_features, linear.out_features, **options)
    # loralib drew a fresh weight; the pretrained one replaces it, shared rather than copied.
    layer.weight, layer.bias = linear.weight, linear.bias
    # LoRA weights train in fp32 over a bf16 base, as PEFT's do: bf16 would round away small updates.
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = layer.lora_B.data.float()
    return layer


def prepare_for_training(model: ModuleT, config: LoralibConfig) -> ModuleT:
    """Add the LoRA layers and freeze everything else (but the biases `config.bias` trains)."""
    add_lora_layers(model, config)
    lora.mark_only_lora_as_trainable(model, bias=config.bias)
    return model


def lora_state_dict(model: nn.Module, config: LoralibConfig) -> dict[str, torch.Tensor]:
    """`lora.lora_state_dict`: the LoRA weights, plus the biases `config.bias` trains."""
    return {
        name: tensor.detach().contiguous()
        for name, tensor in lora.lora_state_dict(model, config.bias).items()
    }


def save_adapter(model: nn.Module, adapter_dir: Path, config: LoralibConfig, base_model: str) -> list[str]:
    """Write `loralib/` (state dict, config, README) and, where exact, the PEFT files at the root, else
    PEFT_UNAVAILABLE.txt saying why. Returns the formats written."""
    state_dict = lora_state_dict(model, config)
    loralib_dir = adapter_dir / LORALIB_DIR
    loralib_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, loralib_dir / LORALIB_STATE_DICT_FILE, metadata={"format": "pt"})
    (loralib_dir / LORALIB_CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    (loralib_dir / "README.md").write_text(loading_guide(config, base_model), encoding="utf-8")
    try:
        peft_config, peft_state_dict = to_peft(state_dict, config, base_model)
    except PeftConversionError as refusal:
        (adapter_dir / PEFT_UNAVAILABLE_FILE).write_text(f"{refusal}\n", encoding="utf-8")
        return ["loralib"]
    peft_config.save_pretrained(str(adapter_dir))  # PEFT annotates the directory as str
    save_file(peft_state_dict, adapter_dir / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    return ["loralib", "peft"]


class PeftConversionError(ValueError):
    """The loralib adapter has no exact PEFT form; the message says why, for the person downloading it."""


def to_peft(
    state_dict: dict[str, torch.Tensor], config: LoralibConfig, base_model: str
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The same adapter in PEFT's format: a `lora.Linear`'s A and B are PEFT's lora_A and lora_B weights and
    both scale by lora_alpha / r. Raises PeftConversionError where that is not exact."""
    if config.qkv_slices is not None:
        raise PeftConversionError(
            "This adapter was trained with the loralib backend, which gives Phi-3's fused qkv_proj a "
            f"separate rank-{config.r} LoRA for each of its {', '.join(config.qkv_slices)} slices "
            f"(lora.MergedLinear). PEFT's format holds one rank-{config.r} LoRA for the whole of qkv_proj, "
            "so it cannot express these weights. Download it with ?format=loralib, or train with backend "
            "'peft' or with target_modules that leave out qkv_proj to get a PEFT adapter."
        )
    if biases := [name for name in state_dict if "lora_" not in name]:
        raise PeftConversionError(
            f"This loralib adapter also trained biases ({', '.join(biases[:3])}, ...), which PEFT's LoRA "
            "format does not hold as such. Download it with ?format=loralib."
        )
    peft_state_dict = {
        f"base_model.model.{name.removesuffix('.lora_A').removesuffix('.lora_B')}."
        f"{name.rsplit('.', 1)[-1]}.weight": tensor
        for name, tensor in state_dict.items()
    }
    peft_config = LoraConfig(
        r=config.r,
        # PEFT annotates lora_alpha as int, but takes any number: the scaling is lora_alpha / r.
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    return peft_config, peft_state_dict


def loading_guide(config: LoralibConfig, base_model: str) -> str:
    """README.md of `loralib/`: rebuild the layers, then load the pretrained and the LoRA weights."""
    return LOADING_GUIDE.format(
        base_model=base_model,
        targets=", ".join(config.target_modules),
        slices=", ".join(config.qkv_slices or ()) or "none (qkv_proj is not adapted)",
        r=config.r,
        lora_alpha=config.lora_alpha,
        bias=config.bias,
    )


LOADING_GUIDE = """\
# loralib adapter for {base_model}

Trained with Microsoft's [loralib](https://github.com/microsoft/LoRA). `lora_state_dict.safetensors` holds
only the LoRA weights (`lora.lora_state_dict(model, bias="{bias}")`); `loralib_config.json` holds what
rebuilds the layers:

- target modules: {targets} (qkv_proj as a `lora.MergedLinear`, the others as `lora.Linear`)
- qkv_proj slices with a LoRA: {slices}
- r = {r}, lora_alpha = {lora_alpha} (the update is scaled by lora_alpha / r)

Load it in two steps, as loralib does: the pretrained weights, then the LoRA weights, both with
`strict=False`.

```python
import json

import loralib as lora
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

config = json.load(open("loralib_config.json"))
model = AutoModelForCausalLM.from_pretrained("{base_model}")
pretrained = model.state_dict()
for name, linear in list(model.named_modules()):
    short_name = name.rsplit(".", 1)[-1]
    if short_name not in config["target_modules"]:
        continue
    options = dict(
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    if short_name == "qkv_proj":  # Phi-3's fused q, k, v projections: one LoRA per enabled slice
        enable_lora = [part in config["qkv_slices"] for part in ("q", "k", "v")]
        layer = lora.MergedLinear(linear.in_features, linear.out_features, enable_lora=enable_lora, **options)
    else:
        layer = lora.Linear(linear.in_features, linear.out_features, **options)
    model.set_submodule(name, layer)
model.load_state_dict(pretrained, strict=False)  # step 1: the pretrained weights
model.load_state_dict(load_file("lora_state_dict.safetensors"), strict=False)  # step 2: the LoRA weights
model.eval()  # loralib merges the LoRA update into the weights for inference
```
"""
