"""Where MindSpore runs (CPU or an Ascend NPU), and graph-mode compilation of a network's forward."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Literal

import mindspore as ms
import numpy as np

log = logging.getLogger(__name__)

Device = Literal["cpu", "npu"]
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_configured: tuple[str, int] | None = None


def configure(device: Device = "cpu", device_id: int = 0) -> None:
    """Select the MindSpore backend once per process. Inside a Ray NPU actor the visible device is always id 0."""
    global _configured
    target = {"cpu": "CPU", "npu": "Ascend"}[device]
    if _configured == (target, device_id):
        return
    if _configured is not None:
        raise RuntimeError(f"MindSpore already runs on {_configured}; one process uses one device")
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logging: errors only
    ms.set_device(target, device_id) if target != "CPU" else ms.set_device(target)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    _configured = (target, device_id)
    log.debug("MindSpore configured for %s:%d", target, device_id)


def resolve_dtype(name: str) -> ms.Type:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


class CompiledForward:
    """A network's forward compiled with `mindspore.jit` (one graph per input shape, reused across batches).

    Takes and returns NumPy arrays; floating inputs are cast to the network's dtype, outputs come back as float32.
    """

    def __init__(self, fn: Callable, dtype: ms.Type = ms.float32, graph: bool = True):
        self._fn = ms.jit(fn) if graph else fn
        self._dtype = dtype

    def _tensor(self, a: np.ndarray) -> ms.Tensor:
        if np.issubdtype(a.dtype, np.floating):
            return ms.Tensor(a.astype(np.float32)).astype(self._dtype)
        return ms.Tensor(a.astype(np.int32))

    def __call__(self, *arrays: np.ndarray):
        out = self._fn(*(self._tensor(a) for a in arrays))
        if isinstance(out, (tuple, list)):
            return tuple(o.astype(ms.float32).asnumpy() for o in out)
        return out.astype(ms.float32).asnumpy()
