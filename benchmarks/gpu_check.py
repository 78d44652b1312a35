"""GPU check of the model core (< 3 minutes on an H100): CUDA + AMP forward/backward of a real-size WSSS-CRAM
training step (resnet50, output stride 8, batch 8, 448 px crops by default), step time and peak memory,
plus the independent inference module at 512 px tiles. On a machine without CUDA it says so, skips the CUDA
parts and runs one tiny CPU step so the script itself is exercised.

    .venv/bin/python benchmarks/gpu_check.py [--crop 448] [--batch 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.crf import CRFParams
from napari_wsss_cram.core.losses import joint_loss
from napari_wsss_cram.core.model import CRAMNet, ModelConfig, to_input_tensor
from napari_wsss_cram.core.pseudo_labels import batch_pseudo_labels


def synthetic_batch(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 255, (batch, size // 16 + 1, size // 16 + 1, 3)).astype(np.uint8)
    images = np.ascontiguousarray(coarse.repeat(16, axis=1).repeat(16, axis=2)[:, :size, :size])
    return images, torch.from_numpy((rng.random((batch, 3)) < 0.6).astype(np.float32))


def run_steps(device: str, backbone: str, batch: int, crop: int, steps: int, amp: bool, crf_scale: float
              ) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CRAMNet(WSSS4LUAD, ModelConfig(backbone=backbone), weights="auto").to(device)
    cfg = model.config
    print(f"model: {backbone}, OS {cfg.output_stride}, weights {model.weights_source}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    use_amp = amp and device == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    images, labels = synthetic_batch(batch, crop)
    x = to_input_tensor(images, cfg, device=device)
    labels = labels.to(device)
    small = max(16, int(round(crop * crf_scale)))
    small_images = np.stack([np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(im).permute(2, 0, 1)[None].float(), size=(small, small), mode="area")[0]
        .permute(1, 2, 0).round().to(torch.uint8)) for im in images])
    model_times, crf_times = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=amp_dtype, enabled=use_amp):
            out = model(x)
        sync()
        t1 = time.perf_counter()
        cam_small = torch.nn.functional.interpolate(out["cam"].float(), size=(small, small), mode="bilinear")
        pseudo = batch_pseudo_labels(cam_small, small_images, labels, cfg.alpha, cfg.beta, CRFParams(),
                                     cfg.tissue_threshold)
        pseudo = torch.nn.functional.interpolate(torch.from_numpy(pseudo)[:, None].float(), size=(crop, crop),
                                                 mode="nearest")[:, 0].long().to(device)
        t2 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=amp_dtype, enabled=use_amp):
            loss, terms = joint_loss(out, labels, pseudo, x, cfg)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        sync()
        t3 = time.perf_counter()
        if not np.isfinite(terms["total"]):
            raise RuntimeError(f"non-finite loss at step {step}: {terms}")
        if step:  # step 0 warms up cuDNN autotuning and allocators
            model_times.append((t1 - t0) + (t3 - t2))
            crf_times.append(t2 - t1)
        print(f"  step {step}: model fwd+loss+bwd {(t1 - t0) + (t3 - t2):.3f} s, pseudo-labels (CRF at "
              f"{small} px, CPU) {t2 - t1:.3f} s, losses {({k: round(v, 4) for k, v in terms.items()})}",
              flush=True)
    if model_times:
        m, c = float(np.median(model_times)), float(np.median(crf_times))
        print(f"RESULT {device} {backbone} batch {batch} crop {crop} amp={use_amp} ({amp_dtype if use_amp else 'fp32'}): "
              f"model step {m:.3f} s, CRF pseudo-labels {c:.3f} s in-process, CRF share {c / (m + c):.0%}")
    if device == "cuda":
        print(f"RESULT peak GPU memory (training): {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
    model.eval()
    tiles = torch.randn(batch, 3, 512, 512, device=device) if device == "cuda" else torch.randn(1, 3, 64, 64)
    with torch.autocast(device_type=device, dtype=amp_dtype, enabled=use_amp):
        model.predict(tiles)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        seg_probs, cam = model.predict(tiles)
        if device == "cuda":
            torch.cuda.synchronize()
    print(f"RESULT inference predict() on {tuple(tiles.shape)}: {time.perf_counter() - t0:.3f} s, "
          f"seg {tuple(seg_probs.shape)} {seg_probs.dtype}, finite={bool(torch.isfinite(seg_probs).all())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=448)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--crf-scale", type=float, default=0.5, help="CRF runs at this fraction of the crop")
    parser.add_argument("--no-amp", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name(0)}")
        run_steps("cuda", args.backbone, args.batch, args.crop, args.steps, not args.no_amp, args.crf_scale)
    else:
        print("SKIP: no CUDA device here; the CUDA + AMP checks did not run. Running one tiny CPU step instead.")
        run_steps("cpu", "resnet18", 2, 64, 2, False, 1.0)
    print("gpu_check done")


if __name__ == "__main__":
    main()
