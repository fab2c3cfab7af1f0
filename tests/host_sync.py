"""Counting, at the dispatcher, the operations that make the host wait for the device.

On a GPU the host queues kernels and runs ahead; an operation that needs a value of a device
tensor on the host, or whose output shape depends on the data, drains that queue. The
:class:`HostSyncs` mode counts them on any device, so a CPU test can prove that a training step
issues none (on CUDA, ``torch.cuda.set_sync_debug_mode`` is the runtime's own check):

- a read of a value by the host: ``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor
  (``aten._local_scalar_dense``), ``torch.equal``, ``allclose``;
- an output whose shape depends on the values: ``nonzero``, ``masked_select``, ``unique``,
  ``bincount``, ``repeat_interleave`` with a tensor of counts, indexing with a boolean mask;
- host data made a tensor inside the step (``torch.tensor(list)``, ``aten.lift_fresh``): on a
  device that is a blocking copy from pageable memory.

What a kernel does inside its own implementation is not seen (the mode sees the operations the
program dispatches), nor ``tolist()``, which reads memory without dispatching.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS = {
    aten._local_scalar_dense.default: "value read by the host (.item/bool/int/float)",
    aten.equal.default: "torch.equal",
    aten.allclose.default: "allclose",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.unique_dim_consecutive.default: "unique_consecutive",
    aten.lift_fresh.default: "host data made a tensor (torch.tensor)",
}
_REPEAT = (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)
_INDEX = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: step()`` -> ``s.total`` host-synchronising operations, by kind in
    ``s.counts``."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALWAYS:
            self.counts[_ALWAYS[func]] += 1
        elif func in _REPEAT and kwargs.get("output_size") is None:
            self.counts["repeat_interleave with a tensor of counts"] += 1
        elif func in _INDEX and _bool_index(args[1]):
            self.counts["boolean-mask indexing"] += 1
        return func(*args, **kwargs)
