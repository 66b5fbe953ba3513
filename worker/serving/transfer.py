"""Host-to-device copies that do not wait for the device.

A plain `tensor.to("cuda")` from pageable memory synchronises the stream: the host waits until every kernel
queued before the copy has run, a hidden sync in the middle of a step. From pinned memory with
`non_blocking=True` the copy is queued like a kernel (torch keeps the pinned buffer until it is done), so a
step's one wait stays its `tolist()` of the sampled tokens (`worker.serving.sampling`).
"""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` as a tensor on `device`, copied without waiting for the device."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
