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

:func:`reliable_pseudo_labels_batch` runs these rules for a batch in torch, on the device of the maps (the CRF
through its one entry point). :class:`PseudoLabeller` runs them for the trainer's joint training and for
:func:`make_pseudo_labels`: in the step with the torch CRF backend, in a pool of processes with pydensecrf; :func:`make_pseudo_labels` writes a joint model's labels of a patch folder as the
pixel-labelled input of stage 2.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .classes import IGNORE_INDEX
from .crf import CRFParams, dense_crf, dense_crf_isolated, dense_crf_torch, resolve_backend
from .device import tensor_of
from .helper_process import ignore_interrupts
from .model.config import ModelConfig
from .progress import CancelToken, Progress
from .tissue import GRAY_WEIGHTS, TISSUE_THRESHOLD

if TYPE_CHECKING:
    import torch

    from .stain_prior import StainPrior

_DEFAULT_CRF = CRFParams()


def tissue_background(image: np.ndarray, threshold: int | None = TISSUE_THRESHOLD) -> np.ndarray:
    """Boolean (H, W): True where the pixel is near-white (gray > threshold), i.e. not tissue."""
    if threshold is None:
        return np.zeros(image.shape[:2], dtype=bool)
    gray = image[..., :3].astype(np.float32) @ np.array(GRAY_WEIGHTS, dtype=np.float32)
    return gray > threshold


def reliable_pseudo_labels_batch(maps, images, labels, alpha: float = ModelConfig.alpha, beta: float = ModelConfig.beta,
                                 crf: CRFParams | None = _DEFAULT_CRF, tissue_threshold: int | None = TISSUE_THRESHOLD,
                                 background_needs_white: bool = True, crf_isolated: bool = False):
    """The rules above for a batch, in torch on the device of ``maps``: maps (B, K+1, h, w) (any size, resized
    bilinearly to the images), images uint8 RGB (B, H, W, 3), labels (B, K) 0/1 -> uint8 (B, H, W) tensor.

    The torch CRF backend refines the whole batch on that device; pydensecrf runs image by image on the CPU
    ("auto": torch on CUDA, pydensecrf on the CPU), in a helper process with ``crf_isolated`` (GUI callers).
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        maps = torch.as_tensor(maps).detach().float()
        dev = maps.device
        images = torch.as_tensor(images).to(dev)
        present = torch.as_tensor(labels).to(dev).reshape(maps.shape[0], -1) > 0.5   # (B, K)
        b, k = present.shape
        if maps.ndim != 4 or maps.shape[1] != k + 1:
            raise ValueError(f"maps must be (B, K+1, h, w) with K={k} classes, got {tuple(maps.shape)}.")
        if images.ndim != 4 or images.shape[0] != b or images.shape[-1] < 3:
            raise ValueError(f"images must be RGB (B, H, W, 3), got {tuple(images.shape)}.")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}.")
        images = images[..., :3]
        size = tuple(images.shape[1:3])
        if tuple(maps.shape[-2:]) != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        else:
            maps = maps.clone()
        absent = ~present[:, :, None, None]
        maps[:, :k] = maps[:, :k].masked_fill(absent, 0.0)
        if tissue_threshold is None:
            background = torch.zeros((b, *size), dtype=torch.bool, device=dev)
        else:  # near-white: gray > threshold, the weights of tissue_background()
            gray = images.float() @ torch.tensor(GRAY_WEIGHTS, device=dev)
            background = gray > tissue_threshold
        maps[:, :k] = maps[:, :k].masked_fill(background[:, None], 0.0)
        maps[:, k] = maps[:, k].masked_fill(background, 1.0)
        maps = maps.clamp_min(0.0)

        fg_max = maps[:, :k].amax(1) if k else torch.zeros((b, *size), device=dev)
        p_r = torch.full((b, *size), IGNORE_INDEX, dtype=torch.uint8, device=dev)
        low = fg_max < alpha
        if background_needs_white and tissue_threshold is not None:
            low &= background
        p_r[low] = k
        if k:
            confident = fg_max > beta
            p_r = torch.where(confident, maps[:, :k].argmax(1).to(torch.uint8), p_r)
        if crf is None:
            return p_r

        probs = maps + 1e-5  # every pixel gets a valid distribution, also where all maps are zero
        probs[:, :k] = probs[:, :k].masked_fill(absent, 0.0)
        probs = probs / probs.sum(1, keepdim=True)
        if resolve_backend(crf, dev) == "torch":
            p_crf = dense_crf_torch(images, probs, crf).argmax(1)
        else:
            run = dense_crf_isolated if crf_isolated else dense_crf
            p_crf = torch.stack([torch.from_numpy(run(im.cpu().numpy(), p.cpu().numpy(), crf).argmax(0))
                                 for im, p in zip(images, probs, strict=True)]).to(dev)
        pseudo = torch.where(p_r.long() == p_crf, p_r, torch.full_like(p_r, IGNORE_INDEX))
        pseudo[background] = k
        return pseudo


def reliable_pseudo_labels(maps, image: np.ndarray, labels, alpha: float = ModelConfig.alpha, beta: float = ModelConfig.beta,
                           crf: CRFParams | None = _DEFAULT_CRF, tissue_threshold: int | None = TISSUE_THRESHOLD,
                           background_needs_white: bool = True, crf_isolated: bool = False) -> np.ndarray:
    """Pseudo-label (H, W) uint8 in 0..K with 255 = unreliable, from maps (K+1, h, w) and RGB image.

    ``maps`` may be a numpy array or a torch tensor, at any size (bilinearly resized to the image);
    ``labels`` (K,) are the image-level labels (0/1); ``crf=None`` turns the CRF agreement off;
    ``background_needs_white``: background only on near-white pixels (see the module notes);
    ``crf_isolated``: pydensecrf runs in a helper process (GUI callers).
    """
    import torch

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
    out = reliable_pseudo_labels_batch(torch.from_numpy(maps)[None],
                                       tensor_of(image[..., :3])[None],
                                       torch.from_numpy(labels)[None], alpha, beta, crf, tissue_threshold,
                                       background_needs_white, crf_isolated)
    return out[0].numpy()


def batch_pseudo_labels(cams, images: np.ndarray, labels, alpha: float = ModelConfig.alpha, beta: float = ModelConfig.beta,
                        crf: CRFParams | None = _DEFAULT_CRF, tissue_threshold: int | None = TISSUE_THRESHOLD,
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


def merge_strong_labels(pseudo: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Pixel labels (e.g. from corrected masks) win over the reliable pseudo-labels where they are set.

    ``strong`` (B, H, W) is IGNORE_INDEX where a patch has no pixel mask: those pixels keep the pseudo-label.
    This is how corrected masks are mixed in as strong labels during joint training (WSSS-CRAM3).
    """
    import torch

    strong = strong.to(pseudo.device, torch.int64)
    return torch.where(strong != IGNORE_INDEX, strong, pseudo)


# ----------------------------------------------------------------------------------------------- worker pool

def _rule_settings(model_config: dict, use_crf: bool) -> dict:
    """The rule's keyword arguments from a labeller's settings (plain dicts, as the worker processes get)."""
    crf = CRFParams.from_dict(model_config.get("crf")) if use_crf else None
    return {"alpha": model_config["alpha"], "beta": model_config["beta"], "crf": crf,
            "tissue_threshold": model_config["tissue_threshold"],
            "background_needs_white": model_config["background_needs_white"]}


def _pseudo_label_job(maps: np.ndarray, image: np.ndarray, labels: np.ndarray, model_config: dict,
                      use_crf: bool) -> np.ndarray:
    """One image's reliable pseudo-label (runs in a pool process; numpy in, numpy out)."""
    return reliable_pseudo_labels(maps, image, labels, **_rule_settings(model_config, use_crf))


def _noop() -> None:
    return None


class PseudoLabeller:
    """Makes reliable pseudo-labels for a batch: in this process with the torch CRF backend (on the device of
    the maps, the whole batch at once), or, with the pydensecrf backend, in ``workers`` processes (0 = here).
    ``device``: where the maps will be (the CRF backend "auto" resolves with it: torch on CUDA).

    Why the pool is for pydensecrf only: pydensecrf holds the GIL and one CPU core per image, so processes are
    what parallelises it; the torch backend is batched, runs on the model's device and releases the GIL.
    Processes are forked once, before torch starts its thread pools, and live for the whole run; each task
    is one image's maps (K+1, h, w) float32, the image (h, w, 3) uint8 and its label vector. ``model_config``
    (a ModelConfig's ``__dict__``) gives the rule's settings: ``alpha``, ``beta``, ``tissue_threshold``, ``crf``
    and ``background_needs_white``.
    """

    SETTINGS = ("alpha", "beta", "tissue_threshold", "crf", "background_needs_white")

    def __init__(self, workers: int, model_config: dict, use_crf: bool, device: object = None) -> None:
        self.model_config = {k: model_config[k] for k in self.SETTINGS}
        if hasattr(self.model_config["crf"], "to_dict"):  # CRFParams -> plain dict for the worker processes
            self.model_config["crf"] = self.model_config["crf"].to_dict()
        self.use_crf = use_crf
        self.workers = int(workers)
        crf = CRFParams.from_dict(self.model_config["crf"])
        self.backend = resolve_backend(crf, device) if use_crf else None
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0 and self.backend == "pydensecrf":
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method),
                                            initializer=ignore_interrupts)
            for f in [self.pool.submit(_noop) for _ in range(workers)]:
                f.result()  # start the processes now, while this process is still single-threaded
        self.seconds = 0.0  # main-process time spent waiting for labels

    def submit(self, maps: np.ndarray, images: np.ndarray, labels: np.ndarray) -> list[Future] | np.ndarray:
        """Start labelling a batch (numpy in); :meth:`result` returns uint8 (B, H, W)."""
        if self.pool is None:
            return reliable_pseudo_labels_batch(maps, np.ascontiguousarray(images), labels,
                                                **_rule_settings(self.model_config, self.use_crf)).numpy()
        return [self.pool.submit(_pseudo_label_job, m, i, lab, self.model_config, self.use_crf)
                for m, i, lab in zip(maps, images, labels, strict=True)]

    def result(self, pending: list[Future] | np.ndarray) -> np.ndarray:
        """The labels of a :meth:`submit` (waits for the pool's processes)."""
        t0 = time.perf_counter()
        out = pending if isinstance(pending, np.ndarray) else np.stack([f.result() for f in pending])
        self.seconds += time.perf_counter() - t0
        return out

    def label(self, maps, images, labels):
        """Labels of a batch of tensors (maps (B, K+1, h, w), images uint8 (B, H, W, 3), labels (B, K)) as a
        uint8 (B, H, W) tensor on the maps' device: in the step, on that device, with the torch backend."""
        import torch

        if self.pool is not None:
            pending = self.submit(maps.detach().float().cpu().numpy(), images.cpu().numpy(),
                                  labels.detach().cpu().numpy())
            return torch.from_numpy(self.result(pending)).to(maps.device)
        t0 = time.perf_counter()
        out = reliable_pseudo_labels_batch(maps, images, labels, **_rule_settings(self.model_config, self.use_crf))
        self.seconds += time.perf_counter() - t0
        return out

    def label_resized(self, cam, images_u8, labels, size: int):
        """The reliable pseudo-labels of one training step, (B, H, W) int64 on the device of ``cam``: maps and
        images resized to ``size`` for the CRF (its cost is linear in pixels), the labels brought back to the
        input size (nearest). With the torch CRF backend all of it runs on that device, in the step."""
        import torch
        import torch.nn.functional as F

        b, h, w, _ = images_u8.shape
        with torch.no_grad():
            maps = F.interpolate(cam.detach().float(), size=(size, size), mode="bilinear", align_corners=False)
            maps = maps.clamp_min(0)
            imgs = images_u8.to(cam.device, non_blocking=True)
            if size != h or size != w:
                imgs = F.interpolate(imgs.permute(0, 3, 1, 2).float(), size=(size, size), mode="area")
                imgs = imgs.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            out = self.label(maps, imgs.contiguous(), labels.to(cam.device)).long()
            if size != h or size != w:
                out = F.interpolate(out[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        return out

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# ----------------------------------------------------------------------------------------------- stage 2 input

PSEUDO_LABEL_SOURCES = ("segmentation", "maps")


#: "par": colour affinities (core/par.py); "stain": the hematoxylin prior on tumor/stroma crops (core/stain_prior.py)
PSEUDO_LABEL_REFINEMENTS = ("none", "par", "stain")


def segmentation_pseudo_label(probs: np.ndarray, image: np.ndarray, labels, tissue_threshold: float | None = TISSUE_THRESHOLD,
                              min_confidence: float = 0.5, refine: str = "none") -> np.ndarray:
    """Pseudo-label (H, W) uint8 from the segmentation branch's probabilities (K+1, H, W) of a training patch:
    restricted to the patch's image-level classes and to its tissue (near-white is background), the arg-max
    class where its probability among the present classes reaches ``min_confidence``, else 255.

    ``refine="par"``: the restricted probabilities are first refined by the image's colour affinities
    (:func:`~.par.pixel_adaptive_refine`), so each region of uniform colour takes the label its confident pixels
    agree on."""
    import torch

    from .tissue import near_white_mask, restrict_to_tissue

    labels = np.asarray(labels, dtype=np.float32).reshape(1, -1)
    p = tensor_of(probs, np.float32)[None]
    white = None
    if tissue_threshold is not None:
        white = near_white_mask(tensor_of(image[..., :3]).float()[None], tissue_threshold)
    presence = torch.from_numpy(labels)
    if not labels.any():  # no class present: nothing to restrict to, keep the model's own answer
        presence = None
    restricted = restrict_to_tissue(p, white, presence, 0.5)
    if refine == "par":  # "stain" is applied per crop by make_pseudo_labels, after the arg-max
        from .par import pixel_adaptive_refine

        rgb = tensor_of(image[..., :3]).permute(2, 0, 1)[None].float()
        restricted = restrict_to_tissue(pixel_adaptive_refine(rgb, restricted), white, None)
    elif refine not in PSEUDO_LABEL_REFINEMENTS:
        raise ValueError(f"refine must be one of {', '.join(PSEUDO_LABEL_REFINEMENTS)}, got '{refine}'.")
    restricted = restricted[0].numpy()
    label = restricted.argmax(axis=0).astype(np.uint8)
    label[restricted.max(axis=0) < min_confidence] = IGNORE_INDEX
    return label


def _tissue_mask(rgb: np.ndarray, tissue_threshold: float | None) -> np.ndarray:
    """bool (H, W): the patch's tissue, by the same near-white rule as its labels."""

    from .tissue import near_white_mask

    if tissue_threshold is None:
        return np.ones(rgb.shape[:2], bool)
    rgb_t = tensor_of(rgb[..., :3]).float()[None]
    return ~near_white_mask(rgb_t, tissue_threshold)[0].numpy()


def _fit_stain_prior(index, tissue_threshold: float | None, cancel: CancelToken | None
                     ) -> Generator[Progress, None, StainPrior]:
    """Fit the stain prior on the tissue of the patches labelled with both classes of its pair. Progress counts
    these patches first and then every patch, as one "pseudo-labels" bar (the docks show one steady total)."""
    from .data.patches import load_patch_rgb
    from .stain_prior import fit_stain_prior, hematoxylin_density, pair_indices

    dense, sparse = pair_indices(list(index.classes.names))
    both = [i for i in range(len(index)) if index.labels[i][dense] and index.labels[i][sparse]]
    if not both:
        raise ValueError(f"refine 'stain' needs patches labelled with both {index.classes.names[dense]} and "
                         f"{index.classes.names[sparse]}; {index.root} has none. Use refine 'none'.")
    densities = []
    for n, i in enumerate(both):
        if cancel is not None:
            cancel.raise_if_cancelled()
        rgb = load_patch_rgb(index.paths[i])
        tissue = _tissue_mask(rgb, tissue_threshold)
        densities.append(hematoxylin_density(rgb, tissue)[tissue])
        yield Progress("pseudo-labels", n + 1, len(both) + len(index), {"image": index.paths[i].name,
                                                                      "step": "fitting the stain prior"})
    return fit_stain_prior(densities, dense, sparse)


def make_pseudo_labels(checkpoint: str | Path, patches: str | Path, out_dir: str | Path, scale: float | None = None,
                       device: str = "auto", crf_workers: int = 0, overwrite: bool = False,
                       cancel: CancelToken | None = None, source: str = "segmentation", refine: str = "none"
                       ) -> Generator[Progress, None, Path]:
    """Write pseudo-labels of every patch as ``out_dir/mask/<name>.png`` (palette PNG, 255 = unreliable) with
    the patch under ``out_dir/img/`` (hard link, else copy): a pixel-labelled set for
    ``train --stage2 --pseudo out_dir``. Returns ``out_dir``.

    ``source="segmentation"``: the model's segmentation branch (a joint model's, or a segmentation round's for
    the next self-training round), restricted to each patch's image-level
    classes and its tissue (:func:`segmentation_pseudo_label`); ``"maps"``: the paper's reliable labels of the
    activation maps (alpha/beta + CRF agreement, :func:`reliable_pseudo_labels`). ``refine`` (segmentation
    source): ``"par"`` refines the probabilities by colour affinities first (:func:`segmentation_pseudo_label`);
    ``"stain"`` decides tumor against stroma in crops labelled with both by the hematoxylin density
    (:mod:`.stain_prior`, fitted first on those crops' tissue)."""
    import contextlib

    import torch
    from PIL import Image

    from .checkpoint import default_resolution, load_checkpoint
    from .data.patches import discover_patches, load_patch_rgb, write_classes_file
    from .device import resolve_device
    from .errors import CheckpointError, OutputExistsError
    from .io.guard import OutputSet, copy_new
    from .io.png import write_index_png
    from .stain_prior import apply_stain_prior, hematoxylin_density
    from .validate import check_number

    out_dir = Path(out_dir)
    # the one output guard, before any work: never into or over the patches, --overwrite replaces only an
    # earlier pseudo-labels set (its manifest's files)
    guard = OutputSet(out_dir, [patches, checkpoint], "wsss-cram pseudo-labels", overwrite,
                      subfolders=("img", "mask"))
    if scale is not None:
        check_number(scale, "scale", label="--scale")
    if source not in PSEUDO_LABEL_SOURCES:
        raise ValueError(f"source must be one of {', '.join(PSEUDO_LABEL_SOURCES)}, got '{source}'.")
    if refine not in PSEUDO_LABEL_REFINEMENTS:
        raise ValueError(f"refine must be one of {', '.join(PSEUDO_LABEL_REFINEMENTS)}, got '{refine}'.")
    if refine != "none" and source != "segmentation":
        raise ValueError(f"refine '{refine}' applies to the segmentation source's pseudo-labels, not to the maps'.")
    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, map_location="cpu")
    if source == "maps" and not model.has_pseudo_branch:
        raise CheckpointError(f"{checkpoint} is a stage-2 model without activation maps; give the joint "
                              "(stage 1) checkpoint, or use the segmentation source.")
    index = discover_patches(patches, info.classes)
    names: dict[str, Path] = {}
    for path in index.paths:  # class sub-folders may hold the same file name twice: the outputs would collide
        if path.stem in names:
            raise OutputExistsError(f"Two patches share the name '{path.stem}' ({names[path.stem]} and {path}); "
                                    "their pseudo-labels would collide. Rename one.")
        names[path.stem] = path
    if scale is None:  # patches carry no µm/px: the checkpoint's training scale
        scale = float(default_resolution(info, image_has_mpp=False).scale)
    model.to(dev).eval()
    # the CRF worker pool is needed only for the maps' reliable labels
    labeller = (PseudoLabeller(crf_workers, model.config.__dict__, model.config.use_crf, dev) if source == "maps"
                else None)
    stain = None
    if refine == "stain":
        stain = yield from _fit_stain_prior(index, model.config.tissue_threshold, cancel)
    # the fit pass's patches come first on the progress bar
    done_before = sum(1 for labels in index.labels if stain is not None and stain.applies_to(labels))
    with contextlib.ExitStack() as stack:
        if labeller is not None:
            stack.callback(labeller.close)
        tmp = stack.enter_context(guard).build
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
                                                  model.config.tissue_threshold, refine=refine)
            else:
                label = labeller.label(cam[:1].float().clamp_min(0), tensor_of(big)[None],
                                       torch.from_numpy(np.asarray(index.labels[i]))[None])[0].cpu().numpy()
            if label.shape != (h, w):
                label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
            if stain is not None and stain.applies_to(index.labels[i]):
                density = hematoxylin_density(rgb, _tissue_mask(rgb, model.config.tissue_threshold))
                label = apply_stain_prior(label, density, stain, IGNORE_INDEX, background=info.classes.background_index)
            name = path.stem + ".png"
            write_index_png(tmp / "mask" / name, label, info.classes)
            copy_new(path, tmp / "img" / path.name)  # never onto an existing path (a link to another input)
            yield Progress("pseudo-labels", done_before + i + 1, done_before + len(index), {"image": path.name})
        write_classes_file(tmp, info.classes)
        guard.commit()
    return out_dir
