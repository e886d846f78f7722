"""Host lists onto the step's device without waiting for the device.

torch.tensor(values, device="cuda") copies synchronously: torch makes the host wait until
the device has run everything queued before the copy, which in an overlapped step is the
whole previous forward. These copies are non_blocking instead: from pageable memory the
driver takes the bytes before the call returns (so the list may go away at once), and
CUDA's documentation leaves it free to wait for the stream while it stages them, which
pinned staging would rule out (tried once, taken out unmeasured: benchmarks/RESULTS.md).
They go through numpy, which converts a long list of ints several times faster than
torch.tensor.
"""
from __future__ import annotations

import numpy as np
import torch

_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


def to_device(values, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    t = torch.from_numpy(np.array(values, dtype=_NUMPY[dtype]))
    return t if device.type == "cpu" else t.to(device, non_blocking=True)
