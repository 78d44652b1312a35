"""GPU inference throughput (CUDA AMP + channels-last): MP/s of input for resnet50 and resnet18, < 2 min on an H100.

Runs the engine end to end on a synthetic image at the default scale (2.5) and tile (512/64), after a
warm-up, then the bare ``model.predict`` on the same number of tiles for the engine's overhead ratio.
Random-init CRAMNet (same cost as a trained one). Needs only torch + torchvision + this package's source:

    PYTHONPATH=src python3 benchmarks/gpu_predict.py            # or: bash benchmarks/gpu_run.sh OUT
    PYTHONPATH=src python3 benchmarks/gpu_predict.py --device cpu --size 128 --backbones resnet18  # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """Pink/purple smooth noise: tissue everywhere, so every tile runs through the model."""
    rng = np.random.default_rng(seed)
    low = rng.random((size // 16 + 2, size // 16 + 2, 3)).astype(np.float32)
    img = np.kron(low, np.ones((16, 16, 1), np.float32))[:size, :size]
    base = np.array([200, 120, 170], np.float32)
    return np.clip(base + (img - 0.5) * 120 + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def bare_seconds(model, n_tiles: int, tile: tuple[int, int], batch: int, device, amp: bool) -> float:
    import torch

    x = torch.randn(batch, 3, *tile, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.float16) if amp else torch.autocast("cpu", enabled=False)

    def once(n: int) -> None:
        with torch.inference_mode(), ctx:
            probs, _ = model.predict(x[:n])
            probs.float().cpu()

    once(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    left = n_tiles
    while left > 0:
        once(min(batch, left))
        left -= batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="input image side (default 2048 = 4.2 MP)")
    parser.add_argument("--backbones", default="resnet50,resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--crf", action="store_true", help="also time a run with the dense CRF (CPU-bound)")
    args = parser.parse_args()

    import torch

    from napari_wsss_cram.core.classes import WSSS4LUAD
    from napari_wsss_cram.core.inference import PredictSettings, predict_array, resolve_device
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.model.cram import CRAMNet
    from napari_wsss_cram.core.progress import drive

    warnings.simplefilter("ignore")
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.backends.cudnn.benchmark = True
    image = synthetic_image(args.size)
    mp = args.size * args.size / 1e6
    print(f"device {name}; torch {torch.__version__}; image {args.size}x{args.size} ({mp:.1f} MP), scale 2.5, "
          f"tile 512/64, batch {args.batch}, AMP {'on' if device.type == 'cuda' else 'off'}", flush=True)
    print(f"{'backbone':<9} {'tiles':>5} {'seconds':>8} {'MP/s':>8} {'tiles/s':>8} {'bare fwd s':>10} {'overhead':>8} "
          f"{'read s':>7} {'model s':>7}")
    for backbone in args.backbones.split(","):
        model = CRAMNet(WSSS4LUAD, ModelConfig(backbone=backbone.strip()), weights=None).eval()
        settings = PredictSettings(batch=args.batch, device=str(device), tissue_threshold=None, with_probs=False)
        drive(predict_array(model, None, image[:1024, :1024], settings))  # warm-up: cudnn autotune, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        pred = drive(predict_array(model, None, image, settings))
        seconds, tiles = pred.info["seconds"], pred.info["tiles"]
        bare = bare_seconds(model, tiles, pred.info["tile_size"], args.batch, device, device.type == "cuda")
        peak = (f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                if device.type == "cuda" else "")
        print(f"{backbone:<9} {tiles:>5} {seconds:>8.2f} {mp / seconds:>8.2f} {tiles / seconds:>8.1f} "
              f"{bare:>10.2f} {seconds / bare - 1:>8.1%} {pred.info['read_seconds']:>7.2f} "
              f"{pred.info['model_seconds']:>7.2f}{peak}", flush=True)
        if args.crf:
            settings.crf = True
            crop = image[:1024, :1024]
            pred = drive(predict_array(model, None, crop, settings))
            crop_mp = crop.shape[0] * crop.shape[1] / 1e6
            print(f"{backbone:<9} with CRF on {crop.shape[1]}x{crop.shape[0]}: {pred.info['seconds']:.2f} s "
                  f"({crop_mp / pred.info['seconds']:.2f} MP/s; CRF {pred.info['crf_seconds']:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
