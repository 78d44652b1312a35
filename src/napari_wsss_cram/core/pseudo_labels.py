"""Reliable pseudo-labels (RRM, Zhang et al. 2020, adapted by WSSS-CRAM) from per-class activation maps.

Rules, for one image with image-level labels y (K,) and maps M (K+1, H, W), background last:
1. maps of classes absent from y are zeroed;
2. tissue prior: pixels whose gray level is above ``tissue_threshold`` (glass, air spaces; 200 as in the
   WSSS4LUAD baselines) are background: their foreground maps are zeroed and the background map set to 1;
3. high-confidence map p_r: background where max_k M_k (foreground) < alpha, arg-max class where > beta,
   255 (ignore) elsewhere. With ``background_needs_white`` (default), the alpha rule gives background only
   where the prior agrees (near-white); on stained tissue a low foreground maximum means "unsure" (255).
   Why: in H&E, background *is* glass and air space; without this, the DA layer's background channel
   (never supervised on tissue) lends its label to weakly activated tissue, and the segmentation branch
   learns to call tissue background (seen on the synthetic patches of tests/test_model_learnability.py:
   most confident labels were "background" on tissue). ``background_needs_white=False`` is the paper's
   rule as written;
4. p_crf = arg-max of the dense CRF run on the image with the maps normalised to probabilities;
5. pseudo-label = p_r where p_r == p_crf, else 255 (with the CRF off: p_r). Prior pixels stay background.

:class:`PseudoLabeller` runs these rules for a batch in a pool of processes (the trainer's joint training, and
:func:`make_pseudo_labels`); :func:`make_pseudo_labels` writes a joint model's labels of a patch folder as the
pixel-labelled input of stage 2.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .classes import IGNORE_INDEX
from .crf import CRFParams, dense_crf
from .progress import CancelToken, Progress

_DEFAULT_CRF = CRFParams()


def tissue_background(image: np.ndarray, threshold: int | None = 200) -> np.ndarray:
    """Boolean (H, W): True where the pixel is near-white (gray > threshold), i.e. not tissue."""
    if threshold is None:
        return np.zeros(image.shape[:2], dtype=bool)
    gray = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return gray > threshold


def _resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if maps.shape[1:] == tuple(shape):
        return maps
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[None], size=shape, mode="bilinear",
                            align_corners=False)[0]
    return resized.numpy()


def reliable_pseudo_labels(maps, image: np.ndarray, labels, alpha: float = 0.3, beta: float = 0.9,
                           crf: CRFParams | None = _DEFAULT_CRF, tissue_threshold: int | None = 200,
                           background_needs_white: bool = True) -> np.ndarray:
    """Pseudo-label (H, W) uint8 in 0..K with 255 = unreliable, from maps (K+1, h, w) and RGB image.

    ``maps`` may be a numpy array or a torch tensor, at any size (bilinearly resized to the image);
    ``labels`` (K,) are the image-level labels (0/1); ``crf=None`` turns the CRF agreement off;
    ``background_needs_white``: background only on near-white pixels (see the module notes).
    """
    if hasattr(maps, "detach"):
        maps = maps.detach().float().cpu().numpy()
    maps = np.asarray(maps, dtype=np.float32)
    image = np.asarray(image)
    labels = np.asarray(labels).astype(bool).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != labels.size + 1:
        raise ValueError(f"maps must be (K+1, h, w) with K={labels.size} classes, got {maps.shape}.")
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"image must be RGB (H, W, 3), got {image.shape}.")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}.")
    image = np.ascontiguousarray(image[..., :3])
    k = labels.size
    maps = _resize_maps(maps, image.shape[:2]).copy()
    maps[:k][~labels] = 0.0
    background = tissue_background(image, tissue_threshold)
    maps[:k, background] = 0.0
    maps[k, background] = 1.0
    maps = np.clip(maps, 0.0, None)

    fg_max = maps[:k].max(axis=0) if k else np.zeros(image.shape[:2], np.float32)
    p_r = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    low = fg_max < alpha
    if background_needs_white and tissue_threshold is not None:
        low &= background
    p_r[low] = k
    confident = fg_max > beta
    p_r[confident] = maps[:k].argmax(axis=0)[confident]
    if crf is None:
        return p_r

    probs = maps + 1e-5  # every pixel gets a valid distribution, also where all maps are zero
    probs[:k][~labels] = 0.0
    probs /= probs.sum(axis=0, keepdims=True)
    p_crf = dense_crf(image, probs, crf).argmax(axis=0)
    pseudo = np.where(p_r == p_crf, p_r, IGNORE_INDEX).astype(np.uint8)
    pseudo[background] = k
    return pseudo


def batch_pseudo_labels(cams, images: np.ndarray, labels, alpha: float = 0.3, beta: float = 0.9,
                        crf: CRFParams | None = _DEFAULT_CRF, tissue_threshold: int | None = 200,
                        background_needs_white: bool = True) -> np.ndarray:
    """:func:`reliable_pseudo_labels` for a batch: cams (B, K+1, h, w), images uint8 (B, H, W, 3),
    labels (B, K) -> uint8 (B, H, W)."""
    if hasattr(cams, "detach"):
        cams = cams.detach().float().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    return np.stack([reliable_pseudo_labels(c, im, lab, alpha, beta, crf, tissue_threshold,
                                            background_needs_white)
                     for c, im, lab in zip(cams, images, labels, strict=True)])


# ----------------------------------------------------------------------------------------------- worker pool

def _pseudo_label_job(maps: np.ndarray, image: np.ndarray, labels: np.ndarray, model_config: dict,
                      use_crf: bool) -> np.ndarray:
    """One image's reliable pseudo-label (runs in a pool process; numpy in, numpy out)."""
    crf = CRFParams.from_dict(model_config.get("crf")) if use_crf else None
    return reliable_pseudo_labels(maps, image, labels, alpha=model_config["alpha"], beta=model_config["beta"],
                                  crf=crf, tissue_threshold=model_config["tissue_threshold"],
                                  background_needs_white=model_config["background_needs_white"])


def _noop() -> None:
    return None


class PseudoLabeller:
    """Makes reliable pseudo-labels for a batch, in ``workers`` processes (0 = in this process).

    Processes are forked once, before torch starts its thread pools, and live for the whole run; each task
    is one image's maps (K+1, h, w) float32, the image (h, w, 3) uint8 and its label vector. ``model_config``
    (a ModelConfig's ``__dict__``) gives the rule's settings: ``alpha``, ``beta``, ``tissue_threshold``, ``crf``
    and ``background_needs_white``.
    """

    SETTINGS = ("alpha", "beta", "tissue_threshold", "crf", "background_needs_white")

    def __init__(self, workers: int, model_config: dict, use_crf: bool) -> None:
        self.model_config = {k: model_config[k] for k in self.SETTINGS}
        if hasattr(self.model_config["crf"], "to_dict"):  # CRFParams -> plain dict for the worker processes
            self.model_config["crf"] = self.model_config["crf"].to_dict()
        self.use_crf = use_crf
        self.workers = int(workers)
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method))
            for f in [self.pool.submit(_noop) for _ in range(workers)]:
                f.result()  # start the processes now, while this process is still single-threaded
        self.seconds = 0.0  # main-process time spent waiting for labels

    def submit(self, maps: np.ndarray, images: np.ndarray, labels: np.ndarray) -> list[Future] | np.ndarray:
        if self.pool is None:
            return np.stack([_pseudo_label_job(m, i, lab, self.model_config, self.use_crf)
                             for m, i, lab in zip(maps, images, labels, strict=True)])
        return [self.pool.submit(_pseudo_label_job, m, i, lab, self.model_config, self.use_crf)
                for m, i, lab in zip(maps, images, labels, strict=True)]

    def result(self, pending: list[Future] | np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = pending if isinstance(pending, np.ndarray) else np.stack([f.result() for f in pending])
        self.seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# ----------------------------------------------------------------------------------------------- stage 2 input

PSEUDO_LABEL_SOURCES = ("segmentation", "maps")


def segmentation_pseudo_label(probs: np.ndarray, image: np.ndarray, labels, tissue_threshold: float | None = 200,
                              min_confidence: float = 0.5) -> np.ndarray:
    """Pseudo-label (H, W) uint8 from the segmentation branch's probabilities (K+1, H, W) of a training patch:
    restricted to the patch's image-level classes and to its tissue (near-white is background), the arg-max
    class where its probability among the present classes reaches ``min_confidence``, else 255."""
    import torch

    from .tissue import near_white_mask, restrict_to_tissue

    labels = np.asarray(labels, dtype=np.float32).reshape(1, -1)
    p = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))[None]
    white = None
    if tissue_threshold is not None:
        white = near_white_mask(torch.from_numpy(np.ascontiguousarray(image[..., :3])).float()[None], tissue_threshold)
    presence = torch.from_numpy(labels)
    if not labels.any():  # no class present: nothing to restrict to, keep the model's own answer
        presence = None
    restricted = restrict_to_tissue(p, white, presence, 0.5)[0].numpy()
    label = restricted.argmax(axis=0).astype(np.uint8)
    label[restricted.max(axis=0) < min_confidence] = IGNORE_INDEX
    return label


def make_pseudo_labels(checkpoint: str | Path, patches: str | Path, out_dir: str | Path, scale: float | None = None,
                       device: str = "auto", crf_workers: int = 0, overwrite: bool = False,
                       cancel: CancelToken | None = None, source: str = "segmentation"
                       ) -> Generator[Progress, None, Path]:
    """Write pseudo-labels of every patch as ``out_dir/mask/<name>.png`` (palette PNG, 255 = unreliable) with
    the patch under ``out_dir/img/`` (hard link, else copy): a pixel-labelled set for
    ``train --stage2 --pseudo out_dir``. Returns ``out_dir``.

    ``source="segmentation"``: the joint model's segmentation branch, restricted to each patch's image-level
    classes and its tissue (:func:`segmentation_pseudo_label`); ``"maps"``: the paper's reliable labels of the
    activation maps (alpha/beta + CRF agreement, :func:`reliable_pseudo_labels`)."""
    import shutil
    import tempfile

    import torch
    from PIL import Image

    from .checkpoint import default_resolution, load_checkpoint
    from .data.patches import discover_patches, load_patch_rgb, write_classes_file
    from .device import resolve_device
    from .errors import CheckpointError, OutputExistsError
    from .io.outputs import write_index_png

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite.")
    if source not in PSEUDO_LABEL_SOURCES:
        raise ValueError(f"source must be one of {', '.join(PSEUDO_LABEL_SOURCES)}, got '{source}'.")
    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, map_location="cpu")
    if not model.has_pseudo_branch:
        raise CheckpointError(f"{checkpoint} is a stage-2 model without the pseudo-label branch; give the joint "
                              "(stage 1) checkpoint.")
    index = discover_patches(patches, info.classes)
    if scale is None:  # patches carry no µm/px: the checkpoint's training scale
        scale = float(default_resolution(info, image_has_mpp=False).scale)
    model.to(dev).eval()
    # the CRF worker pool is needed only for the maps' reliable labels
    labeller = PseudoLabeller(crf_workers, model.config.__dict__, model.config.use_crf) if source == "maps" else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "img").mkdir()
        (tmp / "mask").mkdir()
        for i, path in enumerate(index.paths):
            if cancel is not None:
                cancel.raise_if_cancelled()
            rgb = load_patch_rgb(path)
            h, w = rgb.shape[:2]
            size = (max(8, round(w * scale)), max(8, round(h * scale)))
            big = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)) if abs(scale - 1) > 1e-6 else rgb
            with torch.no_grad():
                probs, cam, _ = model.predict_with_presence(model.normalize(big[None]))
            if source == "segmentation":
                label = segmentation_pseudo_label(probs[0].float().cpu().numpy(), big, index.labels[i],
                                                  model.config.tissue_threshold)
            else:
                maps = cam[0].float().clamp_min(0).cpu().numpy()
                label = labeller.result(labeller.submit(maps[None], np.ascontiguousarray(big)[None],
                                                        index.labels[i][None]))[0].astype(np.uint8)
            if label.shape != (h, w):
                label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
            name = path.stem + ".png"
            write_index_png(tmp / "mask" / name, label, info.classes)
            try:
                os.link(path, tmp / "img" / path.name)
            except OSError:
                shutil.copy2(path, tmp / "img" / path.name)
            yield Progress("pseudo-labels", i + 1, len(index), {"image": path.name})
        write_classes_file(tmp, info.classes)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if labeller is not None:
            labeller.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
