"""Inference throughput on CPU: megapixels of input per second, end to end vs bare model forward, CRF cost.

For each backbone (random-init CRAMNet, same cost as a trained one), predicts one synthetic H&E-like image
at the default scale (2.5) and tile (512/64) with the engine, then times the bare ``model.predict`` on the
same number of tiles of the same size and batch. The overhead of the engine (reading, resampling,
blending, finalization) is ``end_to_end_time / bare_forward_time - 1`` (target <= 20%).
A second engine run with the dense CRF gives its cost.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/predict_throughput.py --size 512 --backbones resnet18,resnet50

Figures on shared CPU cores are noisy (other jobs compete); repeat and take the best when it matters.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np


def synthetic_he(size: int, seed: int = 0) -> np.ndarray:
    """An H&E-looking image (pink stroma, purple nuclei blobs), tissue everywhere so no tile is skipped."""
    try:
        from napari_wsss_cram.core.sample import make_patch

        rgb, _ = make_patch(seed, size)
        return np.asarray(rgb, np.uint8)
    except Exception:  # the sample generator's signature may differ; a smooth random image costs the same
        import torch
        import torch.nn.functional as F

        rng = np.random.default_rng(seed)
        noise = torch.tensor(rng.random((1, 3, size, size)), dtype=torch.float32)
        smooth = F.avg_pool2d(noise, 9, 1, 4)[0].permute(1, 2, 0).numpy()
        base = np.array([200, 120, 170], np.float32)
        return np.clip(base + (smooth - 0.5) * 300, 0, 255).astype(np.uint8)


def build_model(backbone: str):
    from napari_wsss_cram.core.classes import WSSS4LUAD
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.model.cram import CRAMNet

    return CRAMNet(WSSS4LUAD, ModelConfig(backbone=backbone), weights=None).eval()


def bare_forward_seconds(model, n_tiles: int, tile: tuple[int, int], batch: int) -> float:
    """Time model.predict on n_tiles random normalised tiles, batched as the engine does."""
    import torch

    x = torch.randn(batch, 3, *tile)
    with torch.inference_mode():
        model.predict(x[:1])  # warm-up
        start = time.perf_counter()
        left = n_tiles
        while left > 0:
            n = min(batch, left)
            probs, cam = model.predict(x[:n])
            probs.float().numpy()
            left -= n
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input image side in pixels (default 512)")
    parser.add_argument("--backbones", default="resnet18,resnet50")
    parser.add_argument("--scale", type=float, default=2.5)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-crf", action="store_true", help="skip the CRF run")
    args = parser.parse_args()

    import torch

    from napari_wsss_cram.core.inference import PredictSettings, predict_array
    from napari_wsss_cram.core.progress import drive

    warnings.simplefilter("ignore")
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    image = synthetic_he(args.size)
    mp = image.shape[0] * image.shape[1] / 1e6
    print(f"CPU throughput, {threads} thread(s), image {image.shape[1]}x{image.shape[0]} ({mp:.2f} MP), "
          f"scale {args.scale}, tile {args.tile}, overlap {args.overlap}, batch {args.batch}")
    print(f"{'backbone':<10} {'crf':<4} {'tiles':>5} {'seconds':>8} {'MP/s':>8} {'bare fwd s':>10} "
          f"{'overhead':>8} {'crf s':>7}")
    for backbone in args.backbones.split(","):
        model = build_model(backbone.strip())
        settings = PredictSettings(scale=args.scale, tile=args.tile, overlap=args.overlap, batch=args.batch,
                                   device="cpu", tissue_threshold=None)
        drive(predict_array(model, None, image[:64, :64], settings))  # warm-up (allocator, threads)
        pred = drive(predict_array(model, None, image, settings))
        e2e = pred.info["seconds"]
        bare = bare_forward_seconds(model, pred.info["tiles"], pred.info["tile_size"], args.batch)
        print(f"{backbone:<10} {'no':<4} {pred.info['tiles']:>5} {e2e:>8.2f} {mp / e2e:>8.4f} {bare:>10.2f} "
              f"{e2e / bare - 1:>8.1%} {0.0:>7.2f}")
        if not args.no_crf:
            settings.crf = True
            pred = drive(predict_array(model, None, image, settings))
            e2e_crf = pred.info["seconds"]
            crf = pred.info["crf_seconds"]
            print(f"{backbone:<10} {'yes':<4} {pred.info['tiles']:>5} {e2e_crf:>8.2f} {mp / e2e_crf:>8.4f} "
                  f"{bare:>10.2f} {e2e_crf / bare - 1:>8.1%} {crf:>7.2f}   (CRF = {crf / e2e_crf:.0%} of the run)")


if __name__ == "__main__":
    main()
