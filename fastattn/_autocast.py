"""torch.autocast for fastattn's ops.

Custom ops get no autocast treatment from PyTorch (the dispatcher passes their inputs through
unchanged), so inside ``torch.autocast`` a model would hand fp32 activations and fp32 weights
to them and every kernel would run in fp32. The public functions follow autocast's own policy
instead: operations that are matmuls in disguise (attention, the FFN, the LM head) take their
floating inputs in the autocast dtype; losses are returned in fp32 (``F.cross_entropy`` is on
autocast's fp32 list).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device_type`` ("cpu", "cuda"), or None when off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 had no device argument
        enabled = (torch.is_autocast_enabled() if device_type == "cuda"
                   else torch.is_autocast_cpu_enabled())
    except RuntimeError:  # a device type autocast does not know ("meta"): never autocast
        return None
    if not enabled:
        return None
    get = getattr(torch, "get_autocast_dtype", None)
    if get is not None:
        return get(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def cast(device_type: str, *tensors: Optional[Tensor]) -> tuple:
    """The tensors in the autocast dtype when autocast is on (fp32/fp16/bf16 ones), else as given."""
    target = dtype(device_type)
    if target is None:
        return tensors
    # autocast's eligibility rule: floating point but not float64
    return tuple(t.to(target) if isinstance(t, Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)
