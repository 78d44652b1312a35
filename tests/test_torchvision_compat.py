"""The compatibility import must give a working torchvision, whether or not its C++ ops load."""

from __future__ import annotations

import subprocess
import sys

import torch

from napari_wsss_cram import _torchvision


def test_import_gives_models_and_weights_api():
    tv = _torchvision.import_torchvision()
    model = tv.models.resnet18(weights=None).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 1000)
    assert tv.models.ResNet50_Weights.DEFAULT.meta["categories"][0] == "tench"


def test_nms_operator_exists_and_is_correct():
    _torchvision.import_torchvision()
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = torch.ops.torchvision.nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2]


def test_reference_nms_matches_greedy_definition():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 5, 5], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.1])
    keep = _torchvision._nms_reference(boxes, scores, 0.5).tolist()
    # Box 1 (best) suppresses box 0 (IoU 0.9); box 2 overlaps box 1 by 25/90 and survives.
    assert keep == [1, 2, 3]
    assert _torchvision._nms_reference(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_no_op_where_torchvision_imports_normally():
    """In a fresh interpreter: if plain `import torchvision` works, the helper registers nothing."""
    code = (
        "import sys\n"
        "try:\n"
        "    import torchvision\n"
        "    plain_ok = True\n"
        "except RuntimeError:\n"
        "    plain_ok = False\n"
        "    for m in [m for m in sys.modules if m.startswith('torchvision')]: del sys.modules[m]\n"
        "from napari_wsss_cram import _torchvision as c\n"
        "c.import_torchvision()\n"
        "print(plain_ok, sorted(c.patched))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    plain_ok = out[0] == "True"
    if plain_ok:
        assert out[1:] == ["[]"]
    else:
        assert "'nms'" in " ".join(out[1:])
