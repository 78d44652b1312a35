"""Pixel-labelled image sets: ``img/`` + ``mask/`` (+ ``background-mask/``), as in WSSS4LUAD validation.

Masks are palette or plain index PNGs (class ``k`` = value ``k``, background = ``K``, 255 = unlabelled), read with
the one mask reader ``core.io.png.read_index_png``. A ``background-mask/`` image (1 = not tissue) marks those
pixels as background, which the metric then leaves out, as the challenge does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..classes import IGNORE_INDEX, ClassSpec, class_spec_from_names
from ..errors import DatasetError
from ..io.formats import FLAT_SUFFIXES, MASK_SUFFIXES, is_image_file
from .patches import EpochSeededDataset, read_classes_file


@dataclass(frozen=True)
class PixelSample:
    """One image with its mask (and optional background mask)."""

    image: Path
    mask: Path
    background: Path | None = None
    #: mask value -> class index of the requested classes, when the folder's ``classes.txt`` orders them
    #: differently (None: the values are already the requested indices)
    remap: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.image.stem


@dataclass
class PixelIndex:
    samples: list[PixelSample]
    classes: ClassSpec
    root: Path

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, names: list[str] | set[str]) -> PixelIndex:
        keep = set(names)
        return PixelIndex([s for s in self.samples if s.name in keep], self.classes, self.root)


def _find_by_stem(folder: Path, stem: str) -> Path | None:
    for suffix in MASK_SUFFIXES:
        for p in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if p.is_file():
                return p
    return None


def discover_pixel_dataset(path: str | Path, classes: ClassSpec | str | list[str] | None = None) -> PixelIndex:
    """Pair ``img/NAME.*`` with ``mask/NAME.png`` (and ``background-mask/NAME.png`` when that folder exists).

    Class names: the ``classes`` option, else ``classes.txt`` in ``path``, else WSSS4LUAD.
    Raises :class:`DatasetError` naming the image whose mask is missing, or an empty/odd folder.
    """
    root = Path(path)
    img_dir, mask_dir, bg_dir = root / "img", root / "mask", root / "background-mask"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DatasetError(f"{root}: a pixel-labelled set needs 'img/' and 'mask/' sub-folders "
                           "(plus optional 'background-mask/').")
    folder_names = read_classes_file(root)
    if isinstance(classes, ClassSpec):
        spec = classes
    else:
        spec = class_spec_from_names(classes if classes is not None else folder_names)
    remap = _class_remap(class_spec_from_names(folder_names), spec, root) if folder_names else None
    images = sorted(p for p in img_dir.iterdir() if is_image_file(p, FLAT_SUFFIXES))
    if not images:
        raise DatasetError(f"{img_dir}: no images found.")
    samples = []
    for img in images:
        mask = _find_by_stem(mask_dir, img.stem)
        if mask is None:
            raise DatasetError(f"{img}: no mask '{mask_dir / (img.stem + '.png')}' for this image.")
        bg = _find_by_stem(bg_dir, img.stem) if bg_dir.is_dir() else None
        samples.append(PixelSample(img, mask, bg, remap))
    return PixelIndex(samples, spec, root)


def _class_remap(folder: ClassSpec, wanted: ClassSpec, root: Path) -> tuple[int, ...] | None:
    """Mask value -> index in ``wanted`` for masks written in ``folder``'s class order (``classes.txt``); None
    when the orders agree. Different class sets are an error: the masks cannot be read as the wanted classes."""
    have = [n.lower() for n in folder.names]
    want = [n.lower() for n in wanted.names]
    if have == want:
        return None
    if sorted(have) != sorted(want):
        raise DatasetError(f"{root}: its classes.txt names the classes {', '.join(folder.names)}, but "
                           f"{', '.join(wanted.names)} are needed (the model's). Use masks of these classes, or "
                           "fix classes.txt.")
    table = list(range(256))
    for value, name in enumerate(have):
        table[value] = want.index(name)
    table[folder.background_index] = wanted.background_index
    return tuple(table)


def load_mask(sample: PixelSample, classes: ClassSpec, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The uint8 (H, W) mask of ``sample`` in ``0..K`` (+255), background-mask applied; checked against ``classes``."""
    from ..io.png import read_index_png

    # by colour when the palette holds class colours (a reordered palette maps right); a folder whose
    # classes.txt orders the classes otherwise is remapped by index below instead
    mask = np.asarray(read_index_png(sample.mask, classes if sample.remap is None else None))
    if mask.ndim != 2:
        raise DatasetError(f"{sample.mask}: a mask must be a single-channel index or palette PNG.")
    if shape is not None and mask.shape != tuple(shape):
        raise DatasetError(f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image "
                           f"{sample.image.name} is {shape[1]}x{shape[0]} px.")
    mask = mask.astype(np.uint8, copy=True)
    if sample.remap is not None:
        mask = np.asarray(sample.remap, dtype=np.uint8)[mask]
    bad = (mask > classes.background_index) & (mask != IGNORE_INDEX)
    if bad.any():
        raise DatasetError(
            f"{sample.mask}: holds class index {int(mask[bad].max())} but only {classes.num_outputs} classes "
            f"({', '.join(classes.all_names)}) exist; pass the right --classes."
        )
    if sample.background is not None:
        bg = np.asarray(read_index_png(sample.background))
        if bg.shape != mask.shape:
            raise DatasetError(f"{sample.background}: background mask shape {bg.shape} differs from the mask's {mask.shape}.")
        mask[bg > 0] = classes.background_index
    return mask


def load_pixel_sample(sample: PixelSample, classes: ClassSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb uint8 (H,W,3), mask uint8 (H,W))`` of one pixel-labelled sample."""
    from ..io.images import read_rgb

    rgb = read_rgb(sample.image)
    return rgb, load_mask(sample, classes, rgb.shape[:2])


class PixelDataset(EpochSeededDataset):
    """Map-style dataset of augmented (image, mask) crops for stage-2 training.

    Item ``i`` is ``{"image": rgb uint8 (crop, crop, 3), "target": mask int64 (crop, crop), "weight": float32,
    "index": i}`` (stacked into a ``data.batch.Batch`` by ``collate_batch``); ``weights[i]``
    lets pixel-labelled samples count more (or less) than pseudo-labelled ones. Seeded from ``(seed, epoch, i)``.
    """

    def __init__(self, samples: list[PixelSample], classes: ClassSpec, augment_config, seed: int = 0,
                 weights: list[float] | None = None) -> None:
        self.samples = list(samples)
        self.classes = classes
        self.augment_config = augment_config
        self.seed = int(seed)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.samples)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def labelled_source(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i`` before augmentation: ``(rgb uint8, mask uint8)``."""
        return load_pixel_sample(self.samples[i], self.classes)

    def __getitem__(self, i: int):
        from .augment import augment

        rng = self.item_rng(i)
        rgb, mask = load_pixel_sample(self.samples[i], self.classes)
        rgb, mask = augment(rgb, self.augment_config, rng, mask)
        return {"image": rgb, "target": mask.astype(np.int64), "weight": np.float32(self.weights[i]), "index": int(i)}
