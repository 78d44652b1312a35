"""Open napari on the bundled sample H&E image with the Segment dock, or (headless) segment the sample from the
command line and write the label mask, per-class activation maps and an overlay PNG into an output folder."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headless", action="store_true",
                        help="segment the sample on the command line (default when there is no DISPLAY)")
    parser.add_argument("--out", type=Path, default=Path("demo_output"),
                        help="output folder for the headless demo (default: demo_output/)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model checkpoint to use instead of the bundled demo model")
    parser.add_argument("--image", type=Path, default=None,
                        help="image to segment instead of the bundled sample patch")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                        help="refine the labels with the dense CRF (default off, as `predict` and the dock)")


def _has_display() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def run(args: argparse.Namespace) -> int:
    if args.headless or not _has_display():
        if not args.headless:
            print("No display found: running the headless demo (pass --headless to say so).")
        return run_headless(args)
    return run_gui(args)


def sample_image() -> tuple[str, object]:
    """The demo's H&E sample: (name, uint8 RGB array): the plugin's sample patch (committed synthetic
    validation image, or generated into the cache)."""
    from .._sample_data import sample_patch_paths
    from ..core.io.images import read_rgb

    image_path, _ = sample_patch_paths()
    return f"sample_{image_path.stem}", read_rgb(image_path)


def _load_model(checkpoint: Path | None):
    from ..core.checkpoint import load_checkpoint
    from ..core.errors import CheckpointError
    from ..core.resources import demo_model_path

    path = checkpoint or demo_model_path()
    if checkpoint is None and not path.is_file():
        raise CheckpointError(f"The bundled demo model {path} is missing. Train it with "
                              "`wsss-cram train sample_data/patches --config sample --out runs/sample` "
                              "or pass --checkpoint PATH.")
    return load_checkpoint(path)


def run_headless(args: argparse.Namespace) -> int:
    """Segment the sample and write labels, per-class activation maps and an overlay into ``args.out``."""
    import numpy as np
    from PIL import Image

    from ..core.inference import build_predict_settings, predict_array
    from ..core.io.atomic import atomic_path
    from ..core.io.images import read_rgb
    from ..core.io.png import write_index_png
    from ..core.progress import drive

    model, info = _load_model(args.checkpoint)
    if args.image is not None:
        name, rgb = args.image.stem, read_rgb(args.image)
    else:
        name, rgb = sample_image()
    # The one builder (as `predict` and the dock): the image is read without its µm/px, so the training scale.
    given = {k: v for k, v in (("crf", args.crf), ("device", args.device)) if v is not None}
    settings, _ = build_predict_settings(info, image_has_mpp=False, with_cam=True, **given)
    which = "the bundled demo model (trained on synthetic sample data only)" if args.checkpoint is None \
        else str(info.path)
    print(f"Segmenting {name} ({rgb.shape[1]}x{rgb.shape[0]} px) with {which}, classes "
          f"{', '.join(info.classes.names)}, at scale {settings.scale:g}x…")
    prediction = drive(predict_array(model, info, rgb, settings))
    classes, out = info.classes, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(prediction.labels)
    written = [write_index_png(out / f"{name}_labels.png", labels, classes)]
    if prediction.cam is not None:
        for k, class_name in enumerate(classes.names):
            heat = np.asarray(prediction.cam[k], dtype=np.float32)[..., None] / 255.0
            colored = (heat * np.asarray(classes.colors[k], np.float32)).astype(np.uint8)
            path = out / f"{name}_{class_name}_activation.png"
            with atomic_path(path) as tmp:
                Image.fromarray(colored).save(tmp, format="PNG")
            written.append(path)
    palette = np.asarray(classes.all_colors + ((0, 0, 0),) * (256 - classes.num_outputs), np.float32)
    tissue = (labels < classes.background_index)[..., None]
    blend = np.where(tissue, 0.55 * rgb + 0.45 * palette[labels], rgb).astype(np.uint8)
    path = out / f"{name}_overlay.png"
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate([rgb, blend], axis=1)).save(tmp, format="PNG")
    written.append(path)
    shares = ", ".join(f"{n} {100 * v / max(1, labels.size):.0f}%" for n, v in prediction.class_pixels.items())
    print(f"Class shares: {shares}")
    print(f"Wrote {len(written)} files to {out.resolve()}:")
    for p in written:
        print(f"  {p}")
    return 0


def run_gui(args: argparse.Namespace) -> int:
    """Open napari with the sample image and the Segment dock (using ``--checkpoint`` when given)."""
    import napari

    viewer = napari.Viewer(title="WSSS-CRAM demo")
    if args.image is not None:
        viewer.open(str(args.image), plugin="napari-wsss-cram")
    else:  # File > Open Sample > WSSS-CRAM: the synthetic patch and its (hidden) truth
        viewer.open_sample("napari-wsss-cram", "patch")
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    if args.checkpoint is not None:
        widget.set_checkpoint(args.checkpoint)
    napari.run()
    return 0
