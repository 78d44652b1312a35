"""Image-level-labelled patch datasets: discovery, validation and counts.

Three layouts are read, all into one :class:`PatchIndex` (paths + a 0/1 label matrix + the classes):

- **WSSS4LUAD naming**: a flat folder of ``<id>-[t, s, n].png`` (one 0/1 flag per class). Class names come from
  the ``classes`` option, else a ``classes.txt`` in the folder (written by ``wsss-cram patchify``), else the
  WSSS4LUAD names when there are three flags.
- **CSV**: ``path,<class names...>`` with 0/1 values; paths relative to the CSV's folder.
- **Class sub-folders**: ``root/<class>/*.png``. A file found under several class folders (same content, found by
  hash) is one multi-label patch.

Images are not decoded here (a training set has ~10,000 of them); they are read, and checked, by
:func:`load_patch_rgb` through the one image reader ``core.io.images.read_rgb``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..classes import IGNORE_INDEX, ClassSpec, class_spec_from_names
from ..errors import DatasetError
from ..io.formats import FLAT_SUFFIXES, is_image_file

log = logging.getLogger(__name__)

#: a class with fewer patches than this gets a warning before training
MIN_PATCHES_PER_CLASS = 20
CLASSES_FILE = "classes.txt"

_NAME_RE = re.compile(r"^(?P<id>.*)-\[(?P<flags>\s*[01](?:\s*,\s*[01])*\s*)\]$")


@dataclass
class PatchIndex:
    """Patches with image-level labels: ``labels[i, k] == 1`` when class k is present in ``paths[i]``."""

    paths: list[Path]
    labels: np.ndarray
    classes: ClassSpec
    root: Path
    layout: str = "wsss4luad"
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def counts_per_class(self) -> dict[str, int]:
        """Number of patches holding each class (the paper's 6,579 / 7,076 / 1,832 for WSSS4LUAD)."""
        sums = self.labels.sum(axis=0) if len(self) else np.zeros(self.classes.num_classes, int)
        return {n: int(c) for n, c in zip(self.classes.names, sums, strict=True)}

    def counts_per_combination(self) -> dict[str, int]:
        """Number of patches per label combination, e.g. ``{"tumor+stroma": 950, ...}``, most common first."""
        combos = Counter(
            "+".join(n for n, flag in zip(self.classes.names, row, strict=True) if flag) for row in self.labels
        )
        return dict(combos.most_common())

    def rare_classes(self, min_count: int = MIN_PATCHES_PER_CLASS) -> list[str]:
        return [n for n, c in self.counts_per_class().items() if c < min_count]

    def summary(self) -> str:
        """A short human-readable report of counts, printed before training."""
        lines = [f"{len(self)} patches in {self.root} ({self.layout} layout), classes: {', '.join(self.classes.names)}"]
        lines.append("  per class: " + ", ".join(f"{n} {c}" for n, c in self.counts_per_class().items()))
        lines.append("  per label combination: " + ", ".join(f"{n} {c}" for n, c in self.counts_per_combination().items()))
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def subset(self, indices: list[int] | np.ndarray) -> PatchIndex:
        idx = [int(i) for i in indices]
        return PatchIndex([self.paths[i] for i in idx], self.labels[idx], self.classes, self.root, self.layout,
                          list(self.warnings))


def load_patch_rgb(path: Path) -> np.ndarray:
    """Read one patch as uint8 (H, W, 3) through the one image reader (grayscale/RGBA/16-bit converted there)."""
    from ..io.images import read_rgb

    return read_rgb(path)


def _is_image(p: Path) -> bool:
    return is_image_file(p, FLAT_SUFFIXES)


def read_classes_file(folder: Path) -> list[str] | None:
    """Class names from ``folder/classes.txt`` (comma- or newline-separated), or None when absent."""
    f = Path(folder) / CLASSES_FILE
    if not f.is_file():
        return None
    names = [n.strip() for n in re.split(r"[,\n]", f.read_text(encoding="utf-8")) if n.strip()]
    return names or None


def write_classes_file(folder: Path, classes: ClassSpec) -> None:
    (Path(folder) / CLASSES_FILE).write_text("\n".join(classes.names) + "\n", encoding="utf-8")


def parse_patch_name(path: Path) -> tuple[str, list[int]]:
    """``436219-9328-56427-[1, 1, 0].png`` -> ``("436219-9328-56427", [1, 1, 0])``; DatasetError if malformed."""
    m = _NAME_RE.match(Path(path).stem)
    if not m:
        raise DatasetError(
            f"{path}: the file name does not follow the WSSS4LUAD naming '<id>-[t, s, n].png' "
            "(one 0/1 flag per class in brackets). Rename it, or use a CSV or class sub-folders instead."
        )
    return m.group("id"), [int(v) for v in m.group("flags").split(",")]


def _resolve_classes(classes: ClassSpec | str | list[str] | None, n_flags: int | None, folder: Path) -> ClassSpec:
    if isinstance(classes, ClassSpec):
        spec = classes
    elif classes is not None:
        spec = class_spec_from_names(classes)
    else:
        from_file = read_classes_file(folder)
        if from_file is not None:
            spec = class_spec_from_names(from_file)
        elif n_flags in (None, 3):
            spec = class_spec_from_names(None)
        else:
            raise DatasetError(
                f"{folder}: patch names carry {n_flags} class flags; give the class names with --classes "
                f"a,b,... or a {CLASSES_FILE} in the folder (the WSSS4LUAD default has 3)."
            )
    if n_flags is not None and n_flags != spec.num_classes:
        raise DatasetError(
            f"{folder}: patch names carry {n_flags} class flags but {spec.num_classes} classes were given "
            f"({', '.join(spec.names)})."
        )
    return spec


def _from_names(folder: Path, files: list[Path], classes) -> PatchIndex:
    labels = []
    n_flags = None
    for f in files:
        _, flags = parse_patch_name(f)
        if n_flags is None:
            n_flags = len(flags)
        elif len(flags) != n_flags:
            raise DatasetError(f"{f}: has {len(flags)} class flags where other patches have {n_flags}.")
        if not any(flags):
            raise DatasetError(f"{f}: no class flag is set; every patch needs at least one tissue class.")
        labels.append(flags)
    spec = _resolve_classes(classes, n_flags, folder)
    return PatchIndex(files, np.asarray(labels, dtype=np.uint8), spec, folder, "wsss4luad")


def _from_csv(csv_path: Path, classes) -> PatchIndex:
    base = csv_path.parent
    # utf-8-sig: Excel writes a byte-order mark that would otherwise glue itself to the header's first name
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DatasetError(f"{csv_path}: the CSV needs a header 'path,<class names...>' and at least one row.")
    header = [h.strip() for h in rows[0]]
    if len(header) < 2 or header[0].lower() not in ("path", "file", "filename", "image"):
        raise DatasetError(f"{csv_path}: the header must be 'path,<class names...>', got {','.join(header)}.")
    names = header[1:]
    spec = _resolve_classes(classes if classes is not None else names, None, base)
    if [n.lower() for n in spec.names] != [n.lower() for n in names]:
        raise DatasetError(f"{csv_path}: CSV classes {names} differ from the requested {list(spec.names)}.")
    paths, labels = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DatasetError(f"{csv_path}, line {line_no}: expected {len(header)} columns, got {len(row)}.")
        p = Path(row[0].strip())
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise DatasetError(f"{csv_path}, line {line_no}: image {p} does not exist.")
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            raise DatasetError(f"{csv_path}, line {line_no}: class values must be 0 or 1, got {row[1:]}.") from None
        # exactly 0 or 1 (also written 0.0 / 1.0): a fraction such as 0.6 is not a label, never round it
        if any(v not in (0.0, 1.0) for v in values):
            raise DatasetError(f"{csv_path}, line {line_no}: class values must be 0 or 1, got {row[1:]} "
                               "(fractions are not image-level labels: mark a class present with 1).")
        flags = [int(v) for v in values]
        if not any(flags):
            raise DatasetError(f"{csv_path}, line {line_no}: {p.name} has no class set.")
        paths.append(p)
        labels.append(flags)
    return PatchIndex(paths, np.asarray(labels, dtype=np.uint8), spec, base, "csv")


def _file_hash(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _from_class_folders(root: Path, subdirs: list[Path], classes) -> PatchIndex:
    folder_names = [d.name for d in subdirs]
    if classes is None:
        spec = class_spec_from_names(folder_names)
    else:
        spec = _resolve_classes(classes, None, root)
        lowered = [n.lower() for n in spec.names]
        unknown = [d for d in folder_names if d.lower() not in lowered]
        if unknown:
            raise DatasetError(f"{root / unknown[0]}: folder is not one of the classes {', '.join(spec.names)}.")
    by_hash: dict[str, int] = {}
    paths: list[Path] = []
    labels: list[np.ndarray] = []
    for d in subdirs:
        k = spec.index_of(d.name)
        for f in sorted(p for p in d.iterdir() if _is_image(p)):
            h = _file_hash(f)
            if h not in by_hash:
                by_hash[h] = len(paths)
                paths.append(f)
                labels.append(np.zeros(spec.num_classes, np.uint8))
            labels[by_hash[h]][k] = 1
    if not paths:
        raise DatasetError(f"{root}: the class folders ({', '.join(folder_names)}) hold no images.")
    return PatchIndex(paths, np.stack(labels), spec, root, "class-folders")


def discover_patches(path: str | Path, classes: ClassSpec | str | list[str] | None = None) -> PatchIndex:
    """Find image-level-labelled patches at ``path`` (a folder or a CSV file) in any supported layout.

    Raises :class:`DatasetError` naming the offending file for a malformed name, CSV row, or an empty folder.
    Warnings (a class with fewer than ~20 patches, a class never present) go to the log and ``index.warnings``.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: the training data folder does not exist.")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: expected a folder of patches or a CSV file 'path,<class names...>'.")
        index = _from_csv(path, classes)
    else:
        images = sorted(p for p in path.iterdir() if _is_image(p))
        subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
        csvs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
        if images and any(_NAME_RE.match(p.stem) for p in images):
            holding = [d.name for d in subdirs if any(_is_image(f) for f in d.iterdir())]
            if holding:
                raise DatasetError(f"{path}: holds both bracket-named patches and class sub-folders with images "
                                   f"({', '.join(holding)}); the sub-folders would be ignored. Keep one layout: "
                                   "move the other out of this folder.")
            index = _from_names(path, images, classes)
        elif len(csvs) == 1:
            index = _from_csv(csvs[0], classes)
        elif images:
            parse_patch_name(images[0])  # raises, naming the file
            raise AssertionError  # pragma: no cover
        elif subdirs and any(_is_image(f) for d in subdirs for f in d.iterdir()):
            index = _from_class_folders(path, subdirs, classes)
        elif len(csvs) > 1:
            raise DatasetError(f"{path}: several CSV files ({', '.join(c.name for c in csvs)}); pass one of them.")
        else:
            raise DatasetError(
                f"{path}: no patches found. Expected '<id>-[t, s, n].png' files, a CSV 'path,<classes>', "
                "or one sub-folder of images per class."
            )
    _check_patch_files(index)
    counts = index.counts_per_class()
    for name, count in counts.items():
        if count == 0:
            index.warnings.append(f"class '{name}' has no patch at all; the model cannot learn it.")
        elif count < MIN_PATCHES_PER_CLASS:
            index.warnings.append(f"class '{name}' has only {count} patches (fewer than ~{MIN_PATCHES_PER_CLASS});"
                                  " its maps will be unreliable.")
    for w in index.warnings:
        log.warning("%s", w)
    return index


#: patches smaller than this (per side) are refused: padded to the crop they would train as white glass
MIN_PATCH_SIDE = 16


def _check_patch_files(index: PatchIndex) -> None:
    """Refuse patches too small to hold tissue; warn about identical files labelled differently (one of the
    labels is likely wrong, and the model is taught both)."""
    from PIL import Image, UnidentifiedImageError

    seen: dict[str, int] = {}
    contradictions: list[str] = []
    for i, path in enumerate(index.paths):
        try:
            with Image.open(path) as img:  # the header only
                width, height = img.size
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            continue  # unreadable files are reported by the reader, naming the file, when the patch is loaded
        if min(width, height) < MIN_PATCH_SIDE:
            raise DatasetError(f"{path}: the patch is only {width}x{height} px (at least {MIN_PATCH_SIDE} px a side "
                               "is needed to show tissue); remove it.")
        digest = _file_hash(path)
        if digest in seen:
            j = seen[digest]
            if not np.array_equal(index.labels[i], index.labels[j]):
                contradictions.append(f"{path.name} {_label_set(index, i)} = {index.paths[j].name} "
                                      f"{_label_set(index, j)}")
        else:
            seen[digest] = i
    if contradictions:
        index.warnings.append(f"{len(contradictions)} patch(es) are the same image as another but labelled "
                              f"differently, e.g. {contradictions[0]}; correct one label or remove one copy.")


def _label_set(index: PatchIndex, i: int) -> str:
    return "{" + ", ".join(n for n, v in zip(index.classes.names, index.labels[i], strict=True) if v) + "}"


def strong_mask_path(patch: Path) -> Path | None:
    """The pixel mask of a patch cut from a pixel-labelled (e.g. corrected) image, if there is one.

    ``patchify(..., strong_masks=True)`` writes it as ``<patch folder>/_strong_masks/<patch name>``. (The
    ``_masks/`` crops of ``keep_masks`` are for checking pseudo-labels and are never trained on.)
    """
    candidate = Path(patch).parent / "_strong_masks" / Path(patch).name
    return candidate if candidate.is_file() else None


class EpochSeededDataset:
    """A map-style dataset whose item ``i`` is augmented with a generator seeded from ``(seed, epoch, i)``: the
    same item of the same epoch is the same crop in any worker process and after a resume."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (workers are not persistent, so they pick it up)."""
        self.epoch = int(epoch)

    def item_rng(self, i: int) -> np.random.Generator:
        """The augmentation generator of item ``i`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(i)])


class PatchDataset(EpochSeededDataset):
    """Map-style dataset of augmented patches for a torch ``DataLoader``.

    Item ``i`` is ``{"image": rgb uint8 (crop, crop, 3), "labels": float32 (K,), "index": i,
    "strong_mask": int64 (crop, crop)}`` (``data.batch.collate_batch`` stacks items into a ``Batch``).
    ``strong_mask`` is the patch's pixel mask (see :func:`strong_mask_path`) augmented with it, or all IGNORE_INDEX:
    the trainer uses it instead of the pseudo-label where it is set (strong labels mixed in, WSSS-CRAM3).
    Augmentation is seeded from ``(seed, epoch, i)``; call :meth:`set_epoch` before each epoch (workers are
    not persistent, so they pick it up).
    """

    def __init__(self, index: PatchIndex, augment_config, seed: int = 0) -> None:
        self.index = index
        self.augment_config = augment_config
        self.seed = int(seed)
        self.epoch = 0
        self.strong_masks = [strong_mask_path(p) for p in index.paths]

    @property
    def n_strong(self) -> int:
        """How many patches carry a pixel mask."""
        return sum(m is not None for m in self.strong_masks)

    def __len__(self) -> int:
        return len(self.index)

    def _strong_mask(self, i: int, rgb: np.ndarray) -> np.ndarray | None:
        """Patch ``i``'s pixel mask (:func:`strong_mask_path`), or None."""
        if self.strong_masks[i] is None:
            return None
        from ..io.png import read_index_png

        mask = read_index_png(self.strong_masks[i])
        if mask.shape != rgb.shape[:2]:
            raise DatasetError(f"{self.strong_masks[i]}: mask {mask.shape} does not match its patch "
                               f"{self.index.paths[i]} {rgb.shape[:2]}.")
        return mask

    def labelled_source(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Patch ``i`` before augmentation with a pixel mask when one is known (uint8 RGB, uint8 mask; K =
        background): its strong mask, or for a patch of one class that class on its tissue; else None."""
        from .mosaic import white_pixels

        rgb = load_patch_rgb(self.index.paths[i])
        mask = self._strong_mask(i, rgb)
        if mask is not None:
            return rgb, np.asarray(mask, dtype=np.uint8)
        flags = self.index.labels[i]
        if int(flags.sum()) != 1:
            return None
        background = len(flags)
        return rgb, np.where(white_pixels(rgb), np.uint8(background), np.uint8(np.argmax(flags))).astype(np.uint8)

    def __getitem__(self, i: int):
        from .augment import augment

        rng = self.item_rng(i)
        rgb = load_patch_rgb(self.index.paths[i])
        mask = self._strong_mask(i, rgb)
        rgb, mask = augment(rgb, self.augment_config, rng, mask)
        if mask is None:
            mask = np.full(rgb.shape[:2], IGNORE_INDEX, dtype=np.int64)
        return {"image": rgb, "labels": self.index.labels[i].astype(np.float32), "index": int(i),
                "strong_mask": mask.astype(np.int64)}
