"""Losses of WSSS-CRAM: image-level BCE, confident cross-entropy, the dense energy loss, and their joint total.

    L = L_cls + background_prior_weight * L_bg + map_presence_weight * L_presence
        + constrained_weight * L_constrained + lambda_seg * (L_ce + energy_weight * L_energy)

``L_bg`` supervises the DA layer's background channel with the near-white tissue prior (glass and air are
background, stained pixels are not). It is this package's addition to the paper: without it, nothing tells
the background channel to stay off weakly activated tissue, the L2 normalisation lets it take those pixels,
and reliable pseudo-labels then hold almost no tissue (see tests/test_model_learnability.py).

The dense energy loss (Tang et al. 2018; used on unreliable regions by RRM, Zhang et al. 2020) is
``-sum_ij S_i^T W_ij S_j`` with W a Gaussian kernel over pixel position and RGB colour. Here it is computed
exactly (a dense bilateral filter, O(N^2) per image, in row chunks so memory stays O(chunk * N)) on the
prediction resized by ``energy_scale``, and normalised by the number of pixel pairs and images so its value
(in [-1, 0]) does not depend on the crop size. S is the gated softmax: the gate is 1 on ignored (255)
pixels and ``max(0, 1 - max_k S_k)`` on confidently labelled ones (RRM), so the energy acts mostly where
the pseudo-label says nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .classes import IGNORE_INDEX
from .model.config import ModelConfig
from .model.cram import to_rgb255
from .tissue import TISSUE_THRESHOLD, near_white_mask


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE with logits against image-level labels (B, K)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def confident_ce(seg_logits: torch.Tensor, pseudo: torch.Tensor, ignore_index: int = IGNORE_INDEX
                 ) -> torch.Tensor:
    """Cross-entropy on pixels with a label (not ``ignore_index``); 0 (still in the graph) if there are none."""
    pseudo = pseudo.long()
    valid = (pseudo != ignore_index).sum()
    if int(valid) == 0:
        return seg_logits.sum() * 0.0
    loss = F.cross_entropy(seg_logits.float(), pseudo, ignore_index=ignore_index, reduction="sum")
    return loss / valid


#: how stage 2 weights the labelled pixels of its cross-entropy (``ModelConfig.ce_weighting``)
CE_WEIGHTINGS = ("uniform", "oeem", "balanced")


def pixel_weighted_ce(seg_logits: torch.Tensor, target: torch.Tensor, image_weight: torch.Tensor | None = None,
                      weighting: str = "uniform", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy on labelled pixels, averaged per image, then over images weighted by ``image_weight`` (B,).

    ``weighting="oeem"`` (online easy-example mining, Li et al. 2022): within each image the labelled pixels
    are weighted by softmax(-loss) rescaled to mean 1, so the pixels whose pseudo-label the model contradicts
    most (the likely wrong ones) count least; the weights are not differentiated through.
    ``weighting="balanced"``: each labelled pixel is weighted by 1/sqrt of its class's share of the batch's
    labelled pixels (mean weight 1), so a rare class (normal lung: ~5% of the pseudo-labels) is not drowned by
    the common ones.
    """
    ce = F.cross_entropy(seg_logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).flatten(1)
    ce = ce.flatten(1)
    counts = valid.sum(1)
    if weighting == "oeem":
        with torch.no_grad():
            scores = (-ce).masked_fill(~valid, float("-inf"))
            weights = torch.softmax(scores, dim=1).nan_to_num(0.0) * counts[:, None].clamp_min(1)
        ce = ce * weights
    elif weighting == "balanced":
        with torch.no_grad():
            labelled = target.flatten(1)[valid].long()
            freq = torch.bincount(labelled, minlength=seg_logits.shape[1]).float() / max(1, labelled.numel())
            class_weight = freq.clamp_min(1e-8).rsqrt() * (freq > 0)
            weights = class_weight[target.flatten(1).long().clamp(max=seg_logits.shape[1] - 1)] * valid
            weights = weights / (weights.sum() / valid.sum().clamp_min(1)).clamp_min(1e-8)
        ce = ce * weights
    elif weighting != "uniform":
        raise ValueError(f"weighting must be one of {', '.join(CE_WEIGHTINGS)}, got '{weighting}'.")
    per_image = (ce * valid).sum(1) / counts.clamp_min(1)
    if image_weight is None:
        image_weight = torch.ones_like(per_image)
    image_weight = image_weight.to(per_image) * (counts > 0)
    return (per_image * image_weight).sum() / image_weight.sum().clamp_min(1e-6)


def background_prior_loss(cam: torch.Tensor, image: torch.Tensor, threshold: float = TISSUE_THRESHOLD) -> torch.Tensor:
    """Squared error between the background map ``cam[:, -1]`` (B, h, w) and the share of near-white pixels
    (gray > ``threshold``) of ``image`` (B, 3, H, W, RGB 0..255) under each map pixel."""
    with torch.no_grad():
        white = near_white_mask(image.permute(0, 2, 3, 1), threshold, cleanup=1).float()[:, None]
        target = F.adaptive_avg_pool2d(white, cam.shape[-2:])[:, 0]
    # A squared error, not a BCE: M_bg = |z_bg| / ||z|| is 0 wherever z_bg changes sign, so log(M_bg) has a
    # singularity there and a BCE step from random init throws the whole map to background (measured: the
    # loss jumped 0.8 -> 3.8 in one SGD step). The squared error has bounded gradients and the same optimum.
    return (cam[:, -1].float() - target).square().mean()


def map_presence_loss(cam: torch.Tensor, labels: torch.Tensor, top: float = 0.1) -> torch.Tensor:
    """BCE between each tissue-class map's mean over its top ``top`` share of pixels and the image label.

    Why: the collaborative classifier can read class presence from the features alone, so nothing in the
    paper's losses stops the DA maps from being flat (measured on the synthetic patches after 150 steps:
    each class map was nearly constant over the tissue, so no pixel passed beta and the pseudo-labels held no
    foreground). Asking the map itself to be near 0 everywhere for an absent class and high somewhere for a
    present one (a top-k pooled CAM loss) makes the maps localise, as a CAM's do.
    """
    maps = cam[:, : labels.shape[1]].float().flatten(2)  # (B, K, N)
    k = max(1, int(round(top * maps.shape[-1])))
    pooled = maps.topk(k, dim=-1).values.mean(-1).clamp(1e-4, 1 - 1e-4)  # maps lie in [0, 1]
    target = labels.float()
    return -(target * pooled.log() + (1 - target) * (1 - pooled).log()).mean()


def label_constrained_loss(seg_logits: torch.Tensor, labels: torch.Tensor, image: torch.Tensor,
                           threshold: float = TISSUE_THRESHOLD, top: float = 0.05, share: float = 0.3) -> torch.Tensor:
    """Image-level labels as constraints on the segmentation branch's softmax S (B, K+1, H, W), per crop:

    - *allowed mass*: on tissue pixels, -log of the probability summed over the crop's present classes, so
      absent classes and background are pushed to zero there (a one-class crop is then fully supervised);
      on near-white pixels, -log S_background;
    - *presence*: each present class's mean over its top ``top`` share of tissue pixels should be 1;
    - *share prior*: in a crop with two or more present classes, each must hold >= ``share`` of the tissue
      (hinge on the log share). Why: tumor sits beside stroma in almost every crop and is recognised from a
      few distinctive spots, so without a floor a 5% presence lets a model call nearly all tumor stroma.

    ``image`` is RGB (B, 3, H, W) in 0..255 (the tissue mask), ``labels`` (B, K) 0/1. Float32 throughout.
    """
    with torch.autocast(device_type=seg_logits.device.type, enabled=False):
        log_probs = seg_logits.float().log_softmax(dim=1)
        b, c = log_probs.shape[:2]
        k = labels.shape[1]
        tissue = ~near_white_mask(image.permute(0, 2, 3, 1), threshold, cleanup=1)
        if tissue.shape[-2:] != log_probs.shape[-2:]:
            tissue = F.interpolate(tissue[:, None].float(), size=log_probs.shape[-2:], mode="nearest")[:, 0] > 0.5
        present = labels.float() > 0.5                                   # (B, K)
        allowed = torch.cat([present, torch.zeros_like(present[:, :1])], dim=1)  # background not allowed
        masked = log_probs.masked_fill(~allowed[:, :, None, None], float("-inf"))
        allowed_log = torch.logsumexp(masked, dim=1)                     # (B, H, W); -inf if nothing present
        no_class = ~present.any(dim=1)
        allowed_log = torch.where(no_class[:, None, None], log_probs[:, c - 1], allowed_log)
        target_log = torch.where(tissue, allowed_log, log_probs[:, c - 1])
        mass = -target_log.flatten(1).mean(1)                            # (B,)

        probs = log_probs[:, :k].exp().flatten(2)                        # (B, K, N)
        tissue_flat = tissue.flatten(1).float()                          # (B, N)
        n_tissue = tissue_flat.sum(1).clamp_min(1.0)
        n_top = max(1, int(round(top * probs.shape[-1])))
        # top share among tissue pixels: non-tissue pixels sit at -1 so they are taken last
        on_tissue = torch.where(tissue_flat[:, None] > 0, probs, torch.full_like(probs, -1.0))
        top_mean = on_tissue.topk(n_top, dim=-1).values.clamp_min(0.0).mean(-1).clamp(1e-4, 1.0)
        has_tissue = (tissue_flat.sum(1) >= n_top).float()[:, None]
        presence = -(top_mean.log() * present.float() * has_tissue).sum(1)
        shares = (probs * tissue_flat[:, None]).sum(-1) / n_tissue[:, None]
        multi = (present.sum(1) >= 2).float()[:, None] * has_tissue
        floor = (torch.log(torch.tensor(float(share))) - shares.clamp_min(1e-4).log()).clamp_min(0.0)
        share_term = (floor * present.float() * multi).sum(1)
        return (mass + presence + share_term).mean()


def _bilateral_features(image: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..255 -> (B, N, 5) features (y/sxy, x/sxy, rgb/srgb)."""
    b, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=image.device, dtype=torch.float32),
                            torch.arange(w, device=image.device, dtype=torch.float32), indexing="ij")
    position = torch.stack([ys, xs]).view(1, 2, h * w).expand(b, -1, -1) / sigma_xy
    colour = image.float().reshape(b, 3, h * w) / sigma_rgb
    return torch.cat([position, colour], dim=1).transpose(1, 2).contiguous()


def dense_gaussian_filter(values: torch.Tensor, features: torch.Tensor, chunk_elements: int | None = None
                          ) -> torch.Tensor:
    """Exact dense filter: out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j. values (B, N, C), features (B, N, D).

    Computed in row chunks so the kernel never exists in full (memory O(chunk * N)).
    """
    b, n, _ = values.shape
    if chunk_elements is None:
        # ~1 MB chunks stay in the CPU cache (measured fastest); the GPU wants big ones.
        chunk_elements = 2 ** 26 if values.is_cuda else 2 ** 18
    rows = max(1, min(n, chunk_elements // max(1, n)))
    # -|f_i - f_j|^2 / 2 = f_i.f_j - |f_i|^2/2 - |f_j|^2/2 as ONE matmul of augmented features, so each
    # kernel chunk is written once and exponentiated in place.
    half_sq = -0.5 * (features * features).sum(-1, keepdim=True)
    ones = torch.ones_like(half_sq)
    left = torch.cat([features, half_sq, ones], dim=-1)
    right = torch.cat([features, ones, half_sq], dim=-1).transpose(1, 2).contiguous()
    out = torch.empty_like(values)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        # min=-60 keeps exp() and the products after it out of float32 denormals, ~10x slower on CPU
        # (measured); e^-60 ~ 1e-26 is nil next to the diagonal term 1.
        kernel = torch.bmm(left[:, start:stop], right).clamp_(min=-60.0, max=0.0).exp_()
        out[:, start:stop] = torch.bmm(kernel, values)
    return out


class _DenseEnergy(torch.autograd.Function):
    """E = -sum_b sum_ij S_i . S_j W_ij / (B N^2); dE/dS = -2 (W S) / (B N^2) since W is symmetric."""

    @staticmethod
    def forward(ctx, gated: torch.Tensor, features: torch.Tensor) -> torch.Tensor:  # gated: (B, N, C)
        b, n, _ = gated.shape
        filtered = dense_gaussian_filter(gated, features)
        norm = float(b) * float(n) * float(n)
        ctx.save_for_backward(filtered)
        ctx.norm = norm
        return -(gated * filtered).sum() / norm

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (filtered,) = ctx.saved_tensors
        return grad_output * (-2.0 / ctx.norm) * filtered, None


def energy_gate(probs: torch.Tensor, pseudo: torch.Tensor | None, ignore_index: int = IGNORE_INDEX
                ) -> torch.Tensor:
    """RRM gate (B, 1, H, W), no gradient: 1 on unlabelled pixels, max(0, 1 - max_k S_k) on labelled ones."""
    with torch.no_grad():
        gate = (1.0 - probs.amax(dim=1, keepdim=True)).clamp(min=0.0)
        if pseudo is None:
            return torch.ones_like(gate)
        gate[(pseudo == ignore_index)[:, None]] = 1.0
    return gate


def dense_energy_loss(seg_logits: torch.Tensor, image: torch.Tensor, pseudo: torch.Tensor | None = None,
                      sigma_xy: float = 200.0, sigma_rgb: float = 15.0, scale: float = 0.5) -> torch.Tensor:
    """Dense (bilateral) energy loss of the softmax of ``seg_logits`` (B, C, H, W).

    ``image``: RGB (B, 3, H, W) in 0..255; ``pseudo``: (B, H, W) labels with 255 = unlabelled (None = all
    unlabelled); ``sigma_xy`` is in input pixels (it is scaled with ``scale``); ``sigma_rgb`` in grey levels.
    """
    with torch.autocast(device_type=seg_logits.device.type, enabled=False):
        probs = seg_logits.float().softmax(dim=1)
        image = image.float()
        if scale != 1.0:
            size = (max(1, round(probs.shape[-2] * scale)), max(1, round(probs.shape[-1] * scale)))
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            image = F.interpolate(image, size=size, mode="nearest")
            if pseudo is not None:
                pseudo = F.interpolate(pseudo[:, None].float(), size=size, mode="nearest")[:, 0].long()
        gated = probs * energy_gate(probs, pseudo)
        b, c = gated.shape[:2]
        features = _bilateral_features(image, sigma_xy * scale, sigma_rgb)
        return _DenseEnergy.apply(gated.reshape(b, c, -1).transpose(1, 2), features)


def joint_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor | None, pseudo: torch.Tensor | None,
               x: torch.Tensor, config: ModelConfig, image_weight: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss for one batch and its terms (as floats, for logging).

    Stage 1: ``L_cls`` always, ``L_bg`` with the DA layer; with ``config.use_joint`` and pseudo-labels, ``lambda_seg * (L_ce +
    energy_weight * L_energy)`` is added (``energy_weight = 0`` drops the energy). Stage 2: ``L_ce +
    energy_weight * L_energy`` only, ``L_ce`` averaged per image with ``image_weight`` (B,) (pixel-labelled vs
    pseudo-labelled samples) and ``config.ce_weighting`` inside each image. ``x`` is the normalised input (the
    energy needs its colours).
    """
    terms: dict[str, torch.Tensor] = {}
    seg_weight = 1.0
    if config.stage == 1:
        if labels is None or "logits" not in outputs:
            raise ValueError("Stage-1 training needs image-level labels and the model's logits.")
        terms["cls"] = classification_loss(outputs["logits"], labels)
        if config.use_da and config.background_prior_weight > 0 and config.tissue_threshold is not None:
            terms["bg"] = background_prior_loss(outputs["cam"], to_rgb255(x.detach(), config),
                                                config.tissue_threshold)
        if config.use_da and config.map_presence_weight > 0:
            terms["presence"] = map_presence_loss(outputs["cam"], labels, config.map_presence_top)
        if config.constrained_weight > 0:
            terms["constrained"] = label_constrained_loss(
                outputs["seg"], labels, to_rgb255(x.detach(), config), config.tissue_threshold,
                config.constrained_top, config.constrained_share)
        seg_weight = config.lambda_seg
        use_seg = config.use_joint and pseudo is not None
    else:
        if pseudo is None:
            raise ValueError("Stage-2 training needs pixel labels (saved pseudo-labels).")
        use_seg = True
    if use_seg and config.stage == 1:
        terms["ce"] = confident_ce(outputs["seg"], pseudo)
    elif use_seg:
        terms["ce"] = pixel_weighted_ce(outputs["seg"], pseudo, image_weight, config.ce_weighting)
    if use_seg:
        if config.energy_weight > 0:
            terms["energy"] = dense_energy_loss(outputs["seg"], to_rgb255(x.detach(), config), pseudo,
                                                config.energy_sigma_xy, config.energy_sigma_rgb,
                                                config.energy_scale)
    total = terms.get("cls", outputs["seg"].sum() * 0.0)
    if "bg" in terms:
        total = total + config.background_prior_weight * terms["bg"]
    if "presence" in terms:
        total = total + config.map_presence_weight * terms["presence"]
    if "constrained" in terms:
        total = total + config.constrained_weight * terms["constrained"]
    if use_seg:
        seg_total = terms["ce"] + config.energy_weight * terms.get("energy", 0.0)
        total = total + seg_weight * seg_total
    logged = {name: float(value.detach()) for name, value in terms.items()}
    logged["total"] = float(total.detach())
    return total, logged
