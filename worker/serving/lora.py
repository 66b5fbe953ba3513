"""LoRA adapters applied per row: one forward pass serves rows of different adapters and of the base model.

PEFT's own mixed-batch path (`adapter_names=[...]`) loops over the adapters of a batch in every layer and
registers hooks on every module at every forward: on the tiny Phi-3 an 8-row decode step took 6.0 ms with 8
adapters against 1.4 ms with one active adapter. Here each adapted `nn.Linear` is wrapped in a
`MultiLoraLinear` that keeps every loaded adapter stacked by slot, in the base layer's dtype. A batch whose
rows share one adapter takes PEFT's arithmetic, so in fp32 its outputs equal `PeftModel.generate` bit for bit.
A mixed batch comes with its rows sorted by slot (the engine keeps them so), and each adapter's tokens take
its own A and B: they are gathered into one segment per slot, padded to the longest, and two batched matmuls
run over a view of the stacks, with no copy of the weights (`Segments`). Rows of the base model are left
alone. On the CPU its outputs match PeftModel's to rounding.

`torch.nn.functional.grouped_mm` would skip the padding, but outside its native kernels (bf16 on Hopper) it
loops over the groups: on the CPU that cost twice the batched matmuls here for one row per adapter, and on
other GPUs its loop first copies the offsets to the host, a sync in every adapted layer. Padding is only
needed when segments differ in length or slots in the range have no rows; it costs low-rank compute and a
gather of the adapted tokens' activations, at worst for tokens × slots in the range.

Over a bf16 base the deltas are computed in bf16, unlike PEFT, which keeps adapters in fp32 and upcasts each
layer's input: serving saves that activation-sized copy per adapted layer.

Only plain LoRA is applied: `read_adapter` refuses every PEFT feature that changes the arithmetic (DoRA,
modules_to_save, LoRA biases, ...) rather than serving it wrong. Nothing in an adapter is trusted: its rank
and alpha must be ones a job may ask for (`app.limits`), its tensors must be named after the base model's
linear layers and shaped for them at that rank, and a file safetensors cannot read is refused like the rest.
Adapter weights are read in LORA_DTYPE and cast to the model's dtype when installed, so QLoRA's bf16 adapters
apply over an fp32 base as PEFT applies them. loralib adapters are read into the same form by
`worker.serving.loralib_adapter`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from app.limits import MAX_LORA_ALPHA, MAX_LORA_RANK
from worker.adapter_archive import MAX_ADAPTER_BYTES, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, InvalidAdapter
from worker.serving.transfer import to_device

BASE_SLOT = 0  # the slot of rows without an adapter; it never holds weights
LORA_DTYPE = torch.float32  # adapters are read in it, then installed in the model's dtype

# LoraConfig fields that are free to take any value: they describe the adapter or its training, or they only
# decide which modules have weights (the weights file says that) and with which rank and alpha (read below).
_DESCRIPTIVE_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "bias",
    "use_rslora", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core",
    "qalora_group_size", "runtime_config", "loftq_config", "ensure_weight_tying", "init_lora_weights",
}  # fmt: skip
# Initialisations that leave the base weights alone; PiSSA, OLoRA, LoftQ and the like rewrite them.
_PLAIN_INITS = {True, False, "gaussian"}
# A key of rank_pattern or alpha_pattern: PEFT matches it as a regular expression against layer names, so
# only layer names (letters, digits, "_" and ".") are taken; a nested quantifier could run for hours.
_PATTERN_KEY = re.compile(r"[\w.]{1,200}")
_MAX_PATTERN_KEYS = 1024


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: `delta(x) = B(A(x)) * scaling`."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class AdapterWeights:
    """A LoRA adapter read from disk, keyed by the names of the base model's linear layers."""

    modules: dict[str, LoraModule]


def read_adapter(
    directory: Path, linear_shapes: dict[str, tuple[int, int]], device: torch.device
) -> AdapterWeights:
    """Read and check a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for a base model
    whose linear layers have `linear_shapes` ({name: (in_features, out_features)})."""
    config = _read_config(directory / PEFT_CONFIG_FILE)
    weights_path = directory / PEFT_WEIGHTS_FILE
    if not weights_path.is_file():
        raise InvalidAdapter(f"the adapter has no {PEFT_WEIGHTS_FILE}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(weights_path).items():
        name, part = _split_key(key)
        pairs.setdefault(name, {})[part] = tensor
    modules = {}
    for name, pair in pairs.items():
        if set(pair) != {"a", "b"}:
            raise InvalidAdapter(f"layer {name} lacks lora_A or lora_B")
        if name not in linear_shapes:
            raise InvalidAdapter(f"the base model has no linear layer {name}")
        rank, scaling = config.rank_and_scaling(name)
        in_features, out_features = linear_shapes[name]
        a, b = pair["a"], pair["b"]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise InvalidAdapter(
                f"layer {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                f"rank {rank} over a {in_features}->{out_features} linear layer"
            )
        modules[name] = LoraModule(a.to(device, LORA_DTYPE), b.to(device, LORA_DTYPE), scaling)
    if not modules:
        raise InvalidAdapter("the adapter has no LoRA weights")
    return AdapterWeights(modules)


def largest_adapter_bytes(linear_shapes: dict[str, tuple[int, int]]) -> int:
    """The most bytes an adapter of a base model with these linear layers can hold, in any format: every
    layer adapted at the largest rank a job may ask for (three times it: a loralib fused qkv_proj stacks one
    LoRA per slice), in fp32, plus 1 MiB for its config and README. Its archive may not expand beyond it."""
    weights = sum(3 * MAX_LORA_RANK * (i + o) * 4 for i, o in linear_shapes.values())
    return min(weights + 2**20, MAX_ADAPTER_BYTES)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU); InvalidAdapter if safetensors cannot read it or a
    tensor is not of floats. The readers check their names and shapes."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise InvalidAdapter(f"unreadable {path.name}: {exc}") from exc
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InvalidAdapter(
                f"tensor {key} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, not LoRA weights"
            )
    return tensors


def checked_rank(value: Any, where: str) -> int:
    """A LoRA rank from an adapter's config: an integer a job may ask for."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LORA_RANK:
        raise InvalidAdapter(f"{where}: r={value!r} is not a rank between 1 and {MAX_LORA_RANK}")
    return value


def checked_alpha(value: Any, where: str) -> float:
    """A lora_alpha from an adapter's config: a finite number a job may ask for."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or abs(value) > MAX_LORA_ALPHA
    ):
        raise InvalidAdapter(f"{where}: lora_alpha={value!r} is not a number within ±{MAX_LORA_ALPHA:g}")
    return float(value)


@dataclass(frozen=True)
class _Scaling:
    """The rank and alpha settings of an adapter_config.json."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def rank_and_scaling(self, name: str) -> tuple[int, float]:
        """A layer's rank and scaling, found exactly as PEFT's LoraModel._create_and_replace finds them."""
        rank = self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), name), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(list(self.alpha_pattern), name), self.lora_alpha)
        return rank, alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _read_config(path: Path) -> _Scaling:
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise InvalidAdapter(f"unreadable {PEFT_CONFIG_FILE}: {exc}") from exc
    if not isinstance(fields, dict) or fields.get("peft_type") != "LORA":
        raise InvalidAdapter("only LoRA adapters (peft_type LORA) are served")
    defaults = LoraConfig()
    known = {field.name for field in dataclasses.fields(LoraConfig)}
    for name, value in fields.items():
        if name in _DESCRIPTIVE_FIELDS:
            continue
        # A field of a newer PEFT is harmless while it is off; a known one must keep PEFT's default.
        changed = value != _jsonable(getattr(defaults, name)) if name in known else bool(value)
        if changed:
            raise InvalidAdapter(f"unsupported LoRA setting {name}={value!r}: only plain LoRA is served")
    if fields.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise InvalidAdapter(f"init_lora_weights={fields['init_lora_weights']!r} changes the base weights")
    rank_pattern = _pattern(fields.get("rank_pattern"), "rank_pattern")
    alpha_pattern = _pattern(fields.get("alpha_pattern"), "alpha_pattern")
    use_rslora = fields.get("use_rslora", defaults.use_rslora)
    if not isinstance(use_rslora, bool):
        raise InvalidAdapter(f"{PEFT_CONFIG_FILE}: use_rslora={use_rslora!r} is not a boolean")
    return _Scaling(
        r=checked_rank(fields.get("r", defaults.r), PEFT_CONFIG_FILE),
        lora_alpha=checked_alpha(fields.get("lora_alpha", defaults.lora_alpha), PEFT_CONFIG_FILE),
        use_rslora=use_rslora,
        rank_pattern={
            key: checked_rank(value, f"{PEFT_CONFIG_FILE} rank_pattern[{key!r}]")
            for key, value in rank_pattern.items()
        },
        alpha_pattern={
            key: checked_alpha(value, f"{PEFT_CONFIG_FILE} alpha_pattern[{key!r}]")
            for key, value in alpha_pattern.items()
        },
    )


def _pattern(value: Any, field: str) -> dict[str, Any]:
    """rank_pattern or alpha_pattern: an object whose keys are layer names."""
    pattern = value or {}
    if not isinstance(pattern, dict) or len(pattern) > _MAX_PATTERN_KEYS:
        raise InvalidAdapter(
            f"{PEFT_CONFIG_FILE}: {field} must be an object of at most {_MAX_PATTERN_KEYS} keys"
        )
    for key in pattern:
        if not _PATTERN_KEY.fullmatch(key):
            raise InvalidAdapter(f"{PEFT_CONFIG_FILE}: {field} key {key[:200]!r} is not a layer name")
    return pattern


def _jsonable(value: Any) -> Any:
    """A LoraConfig default as adapter_config.json spells it (sets are saved as lists)."""
    return sorted(value) if isinstance(value, set) else value


def _split_key(key: str) -> tuple[str, str]:
    """`base_model.model.model.layers.0.mlp.down_proj.lora_A.weight` → (`model.layers.0.mlp.down_proj`, a)."""
    name = key.removeprefix("base_model.model.")
    for suffix, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
        if name.endswith(suffix):
            return name.removesuffix(suffix), part
    raise InvalidAdapter(f"unsupported tensor {key}: only lora_A and lora_B weights are served")


@dataclass(frozen=True)
class Segments:
    """How a mixed batch's adapted tokens (those of rows with an adapter, the last ones: rows are sorted by
    slot) are laid out for the batched matmuls: [slots, longest], one segment per slot from `first_slot`,
    each padded to the longest with copies of an adapted token, whose results are dropped."""

    first_slot: int
    slots: int
    longest: int
    first_token: int  # the adapted tokens are the batch's tokens from this one on
    # [slots * longest]: the batch's token in each place of the layout, and [adapted tokens]: each adapted
    # token's place; None when the adapted tokens already are the layout (equal segments, no slot skipped).
    gather: torch.Tensor | None
    scatter: torch.Tensor | None

    @staticmethod
    def of(row_slots: list[int], tokens_per_row: int, device: torch.device) -> Segments:
        token_slots = [slot for slot in row_slots if slot != BASE_SLOT for _ in range(tokens_per_row)]
        first_token = len(row_slots) * tokens_per_row - len(token_slots)
        by_slot: dict[int, list[int]] = {}
        for token, slot in enumerate(token_slots, start=first_token):
            by_slot.setdefault(slot, []).append(token)
        first_slot, slots = token_slots[0], token_slots[-1] - token_slots[0] + 1
        longest = max(len(segment) for segment in by_slot.values())
        if slots * longest == len(token_slots):
            return Segments(first_slot, slots, longest, first_token, None, None)
        gather: list[int] = []
        scatter: list[int] = []
        for index in range(slots):
            segment = by_slot.get(first_slot + index, [])
            scatter += range(index * longest, index * longest + len(segment))
            gather += segment + [first_token] * (longest - len(segment))
        return Segments(
            first_slot, slots, longest, first_token, to_device(gather, device), to_device(scatter, device)
        )


class RowAdapters:
    """Which adapter slot each row of the next forward pass uses; shared by every MultiLoraLinear."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.uniform: int | None = BASE_SLOT  # the slot of every row, or None when the rows differ
        self._slots: list[int] = []  # one per row, sorted
        self._segments: dict[int, Segments] = {}

    def select(self, slots: list[int]) -> None:
        if any(later < earlier for earlier, later in itertools.pairwise(slots)):
            raise ValueError("the rows of a mixed-adapter batch must be sorted by adapter slot")
        self.uniform = slots[0] if slots[0] == slots[-1] else None
        self._slots = slots
        self._segments = {}

    def segments(self, tokens: int) -> Segments:
        """The layout of a mixed batch of `tokens` tokens in all, made by the first layer that asks (the
        layers of one forward pass all see the same tokens)."""
        if tokens not in self._segments:
            self._segments[tokens] = Segments.of(self._slots, tokens // len(self._slots), self.device)
        return self._segments[tokens]


class MultiLoraLinear(nn.Module):
    """A linear layer plus the LoRA deltas of many adapters, each row of a batch getting its own."""

    def __init__(self, base_layer: nn.Linear, rows: RowAdapters) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._rows = rows
        # Slot s holds adapter s's matrices, zero-padded to the largest rank. A slot without weights (the base
        # model's, a free one, or one whose adapter leaves this layer alone) is all zeros. The matrices keep
        # PEFT's layout, so a one-adapter batch multiplies by views of them exactly as PEFT's F.linear does.
        weight = base_layer.weight
        self._a = weight.new_zeros(1, 0, base_layer.in_features)
        self._b = weight.new_zeros(1, base_layer.out_features, 0)
        self._scaling = weight.new_zeros(1, 1)
        self._modules_by_slot: dict[int, LoraModule] = {}  # views into the stacks, for one-adapter batches

    def put(self, slot: int, module: LoraModule) -> None:
        """Load `module` into `slot`, in the base layer's dtype."""
        self.reserve(slots=slot + 1, rank=module.rank)
        self._a[slot].zero_()
        self._b[slot].zero_()
        self._a[slot, : module.rank] = module.a
        self._b[slot, :, : module.rank] = module.b
        self._scaling[slot] = module.scaling
        self._modules_by_slot[slot] = self._view(slot, module.rank, module.scaling)

    def clear(self, slot: int) -> None:
        """Unload the adapter in `slot`, so that the slot can be reused."""
        if self._modules_by_slot.pop(slot, None) is not None:
            self._a[slot].zero_()
            self._b[slot].zero_()
            self._scaling[slot] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        uniform = self._rows.uniform
        if uniform is not None:
            module = self._modules_by_slot.get(uniform)
            if module is None:
                return result
            # PeftModel's arithmetic, to the bit: result + lora_B(lora_A(x)) * scaling.
            return result + F.linear(F.linear(x, module.a), module.b) * module.scaling
        flat_x, flat_result = x.reshape(-1, x.shape[-1]), result.view(-1, result.shape[-1])
        segments = self._rows.segments(flat_x.shape[0])
        if segments.gather is None:
            laid_out = flat_x[segments.first_token :]
        else:
            laid_out = flat_x.index_select(0, segments.gather)
        slots = slice(segments.first_slot, segments.first_slot + segments.slots)
        # Each slot's tokens by its own A, then B: views of the stacks, no copy. Scaled after the matmuls, as
        # PEFT does; folding the scaling into B would change the rounding.
        low_rank = torch.bmm(laid_out.view(segments.slots, segments.longest, -1), self._a[slots].mT)
        delta = (torch.bmm(low_rank, self._b[slots].mT) * self._scaling[slots, None]).flatten(0, 1)
        if segments.scatter is not None:
            delta = delta.index_select(0, segments.scatter)
        flat_result[segments.first_token :].add_(delta)
        return result

    def _view(self, slot: int, rank: int, scaling: float) -> LoraModule:
        return LoraModule(self._a[slot, :rank], self._b[slot, :, :rank], scaling)

    def reserve(self, *, slots: int, rank: int = 0) -> None:
        """Make room for slots 0 to `slots` - 1 and for matrices of `rank`."""
        current_slots, current_rank = self._a.shape[0], self._a.shape[1]
        if slots <= current_slots and rank <= current_rank:
            return
        slots, rank = max(slots, 2 * current_slots), max(rank, current_rank)
        a = self._a.new_zeros(slots, rank, self._a.shape[2])
        b = self._b.new_zeros(slots, self._b.shape[1], rank)
        scaling = self._scaling.new_zeros(slots, 1)
        a[:current_slots, :current_rank] = self._a
        b[:current_slots, :, :current_rank] = self._b
        scaling[:current_slots] = self._scaling
        self._a, self._b, self._scaling = a, b, scaling
        self._modules_by_slot = {
            slot: self._view(slot, m.rank, m.scaling) for slot, m in self._modules_by_slot.items()
        }


class MultiLora:
    """The adapters loaded into one base model, by slot. Only the thread that runs the model may call
    `install`, `remove` and `select_rows`; `linear_shapes` is safe to read from any thread."""

    def __init__(self, model: PreTrainedModel) -> None:
        self._model = model
        self.rows = RowAdapters(model.device)
        self.linear_shapes = {
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        }
        self._layers: dict[str, MultiLoraLinear] = {}
        self._layer_names_by_slot: dict[int, list[str]] = {}
        self._slots = BASE_SLOT + 1  # every layer has room for this many slots

    def install(self, slot: int, adapter: AdapterWeights) -> None:
        """Load `adapter` into `slot`, wrapping the linear layers it adapts on first use."""
        if slot >= self._slots:
            # Every layer must take every slot: a mixed batch reads every layer's stacks up to its last slot.
            self._slots = slot + 1
            for layer in self._layers.values():
                layer.reserve(slots=self._slots)
        for name, module in adapter.modules.items():
            self._layer(name).put(slot, module)
        self._layer_names_by_slot[slot] = list(adapter.modules)

    def remove(self, slot: int) -> None:
        """Unload the adapter in `slot`."""
        for name in self._layer_names_by_slot.pop(slot, []):
            self._layers[name].clear(slot)

    def select_rows(self, slots: list[int]) -> None:
        """Set the adapter slot of each row for the next forward pass; rows of different adapters must come
        sorted by slot, each adapter's rows together."""
        self.rows.select(slots)

    def _layer(self, name: str) -> MultiLoraLinear:
        if name not in self._layers:
            parent_name, _, child_name = name.rpartition(".")
            parent = self._model.get_submodule(parent_name)
            layer = MultiLoraLinear(getattr(parent, child_name), self.rows)
            layer.reserve(slots=self._slots)
            setattr(parent, child_name, layer)
            self._layers[name] = layer
        return self._layers[name]
