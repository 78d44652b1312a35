"""Import torchvision, also where its compiled ops do not match the installed torch.

Why: PyPI's torchvision 0.28.0 is a CUDA build. Beside the CPU build of torch 2.13.0 its C++ extension
fails to load, and ``import torchvision`` then dies with
``RuntimeError: operator torchvision::nms does not exist`` while registering a fake kernel for ``nms``
(and then for ``qnms``). This package only needs torchvision's models and weights API, so on *exactly*
that error we define the missing ``torchvision::nms`` / ``torchvision::qnms`` operators with a small
pure-torch kernel through ``torch.library`` and import again.
Where torchvision imports normally, this is a no-op. Everyone in the package imports torchvision via
:func:`import_torchvision`.
"""

from __future__ import annotations

import re
import sys
import threading
from types import ModuleType

_MISSING_OP = re.compile(r"operator torchvision::(nms|qnms) does not exist")
_LIBRARY = None  # keeps the torch.library.Library alive (dropping it unregisters the op)
patched: set[str] = set()  # the operators this module had to define (empty where torchvision is whole)
#: One import at a time: a retry below deletes torchvision's modules, which a second thread (the docks load their
#: model in a worker thread) must not see half-imported ("module 'torchvision' has no attribute 'models'").
_IMPORT_LOCK = threading.RLock()


def _nms_reference(dets, scores, iou_threshold: float):
    """Greedy non-maximum suppression in plain torch (boxes as x1, y1, x2, y2)."""
    import torch

    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    keep = []
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool, device=dets.device)
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        xx1 = torch.maximum(x1[idx], x1)
        yy1 = torch.maximum(y1[idx], y1)
        xx2 = torch.minimum(x2[idx], x2)
        yy2 = torch.minimum(y2[idx], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[idx] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _qnms_reference(dets, scores, iou_threshold: float):
    return _nms_reference(dets.dequantize(), scores.dequantize(), iou_threshold)


def _register(op: str) -> None:
    global _LIBRARY
    import torch

    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
    _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    kernel = _nms_reference if op == "nms" else _qnms_reference
    _LIBRARY.impl(op, kernel, "CompositeExplicitAutograd")
    patched.add(op)


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, registering pure-torch ``nms``/``qnms`` first if (and only if) needed.
    Thread-safe."""
    with _IMPORT_LOCK:
        return _import_torchvision()


def _import_torchvision() -> ModuleType:
    for _ in range(3):
        try:
            import torchvision

            return torchvision
        except RuntimeError as err:
            match = _MISSING_OP.search(str(err))
            if match is None or match.group(1) in patched:
                raise
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            _register(match.group(1))
    import torchvision

    return torchvision
