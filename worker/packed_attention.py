"""PyTorch's SDPA over packed batches, one example at a time: the attention that training with packing uses
where FlashAttention-2 is not available (the CPU, and GPUs without flash-attn).

TRL's packed batch is a single row: the packed rows of the batch, concatenated, with `position_ids` that
restart at 0 for each example and no attention_mask, plus the examples' boundaries (`cu_seq_lens_q`, as
FlashAttention-2's variable-length kernel takes them). From the position_ids, transformers builds for SDPA a
block-diagonal causal mask over the whole row, and SDPA computes every score of the row before masking most
of them: with 4 rows of 2048 tokens, attention costs (4 · 2048)² scores a layer, where the examples need only
the sum of their squared lengths. On the CPU that makes a packed step no faster than a padded one. Here each
example attends to itself through causal SDPA, which computes its scores only; outputs and gradients are the
masked SDPA's (tests/worker/test_packing.py).

Any other batch (no boundaries, generation with a cache, or an example longer than the model's sliding
window) goes to transformers' SDPA with its mask, so a model set to this attention computes exactly what it
would with "sdpa". That mask is built only then (`DeferredMask`): for a packed row it is (tokens in the
batch)² booleans, 1 GiB at 8 × 4096, that the example-by-example path never reads.
"""

from __future__ import annotations

import torch
from torch.nn import functional
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "phitune_packed_sdpa"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # batch, heads, tokens, head_dim
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    window = kwargs.get("sliding_window")
    packed = (
        cu_seq_lens_q is not None
        and query.shape[0] == 1
        and key.shape[2] == query.shape[2]  # no cache: keys are the row's own tokens
        and (cu_seq_lens_k is None or torch.equal(cu_seq_lens_k, cu_seq_lens_q))
        and int(cu_seq_lens_q[-1]) == query.shape[2]
        # An example longer than a sliding window (Phi-3-mini's is 2047) attends through the window, which
        # transformers' mask holds and plain causal SDPA does not.
        and (window is None or int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max()) <= window)
    )
    if not packed:
        if isinstance(attention_mask, DeferredMask):
            attention_mask = attention_mask.build()
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    assert cu_seq_lens_q is not None  # for mypy: checked above
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        for start, end in zip(bounds, bounds[1:], strict=False)
        if end > start
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


class DeferredMask:
    """The mask transformers makes for SDPA, made when an attention call first needs it, then shared by the
    layers: the model passes it along untouched, and only this module's attention reads it."""

    builds = 0  # masks actually made, in this process (tests/worker/test_packing.py)

    def __init__(self, **arguments: object) -> None:
        self._arguments: dict | None = arguments
        self._mask: torch.Tensor | None = None

    def build(self) -> torch.Tensor | None:
        if self._arguments is not None:
            self._mask = sdpa_mask(**self._arguments)
            self._arguments = None
            DeferredMask.builds += 1
        return self._mask


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, DeferredMask)  # SDPA's mask, for the batches it hands to SDPA


def use_packed_sdpa(model: PreTrainedModel) -> None:
    """Switch a model that attends with SDPA to this attention (FlashAttention-2 already handles packing)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)
