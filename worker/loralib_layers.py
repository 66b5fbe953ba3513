"""`LowRankMergedLinear`: loralib's `MergedLinear` computing its LoRA update without the dense ΔW.

`lora.MergedLinear`'s forward rebuilds the out × in update (a grouped conv1d of B and A, zero-padded to the
full output width) and multiplies the input by it: for Phi-3's qkv_proj that is a second matmul as large
as the layer's own, and the backward pays for it twice more. The update is x·Aᵀ·Bᵀ per slice, so this layer
multiplies by A (k·r wide for k enabled slices), then by B laid out block by block against the output:
out × k·r. Everything else (the parameters, their names and shapes, `train(False)`'s merge and `merged`) is
loralib's own.
"""

from __future__ import annotations

import loralib as lora
import torch
import torch.nn.functional as F


class LowRankMergedLinear(lora.MergedLinear):
    """A `lora.MergedLinear` whose unmerged forward goes through the rank, never through ΔW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.T if self.fan_in_fan_out else self.weight
        result = F.linear(x, weight, bias=self.bias)
        # loralib applies no dropout when merged or r == 0, so the RNG is drawn exactly when loralib draws it.
        if self.merged or self.r == 0 or not any(self.enable_lora):
            return result
        # Scaling the k·r-wide x·Aᵀ costs fewer multiplications than scaling the output.
        hidden = (self.lora_dropout(x) @ self.lora_A.T) * self.scaling
        # One matmul and an out-of-place sum: adding each slice's product into a slice of `result` in place
        # made autograd copy the whole output gradient once per slice, which cost more than the zero blocks.
        return result + F.linear(hidden, self.block_b())

    def block_b(self) -> torch.Tensor:
        """lora_B as an out × k·r matrix: each enabled slice's rows hold its B in the columns of its A, and
        every other entry is zero."""
        width = self.out_features // len(self.enable_lora)
        # lora_A stacks the enabled slices' A (r rows each) and lora_B their B (`width` rows each), in order.
        bands = iter(torch.block_diag(*self.lora_B.split(width)).split(width))
        zeros = self.lora_B.new_zeros(width, self.lora_A.shape[0])
        return torch.cat([next(bands) if enabled else zeros for enabled in self.enable_lora])
