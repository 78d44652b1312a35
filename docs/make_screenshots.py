"""Render the plugin offscreen into docs/*.png (``make screenshots``; needs Xvfb or a display).

- ``docs/segment_dock.png``: the sample patch segmented by the Segment dock (CRF labels + tumor activation).
- ``docs/activations.png``: each class's activation heatmap of the same run, side by side with the image.
- ``docs/train_dock.png``: the Train dock after scanning sample_data/patches, with the loss and validation
  mIoU curves of the model's own training run (its metrics.csv, when it sits next to the checkpoint).
- at 1366x768 and 1920x1080 (``*_<w>x<h>.png``): the Segment dock with the patch segmented and the class palette,
  a QuPath import, the synthetic slide with a field-of-view result and the scale bar, the Train dock training.
Synthetic sample data only: WSSS4LUAD images may not be redistributed.

Usage: python docs/make_screenshots.py [--checkpoint PATH] [--out docs]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

# vispy draws nothing into a window grab on Qt's "offscreen" platform: render on the (X)vfb display instead.
if os.environ.get("QT_QPA_PLATFORM") == "offscreen" and os.environ.get("DISPLAY"):
    del os.environ["QT_QPA_PLATFORM"]

ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float = 600.0) -> None:
    from qtpy.QtWidgets import QApplication

    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("the plugin did not finish in time")
        QApplication.processEvents()
        time.sleep(0.02)


def settle(seconds: float = 0.5) -> None:
    """Let Qt and vispy draw for a moment, without notification toasts (e.g. napari's PyQt5 notice)."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    for toast in QApplication.topLevelWidgets() + [w for t in QApplication.topLevelWidgets()
                                                   for w in t.findChildren(NapariQtNotification)]:
        if isinstance(toast, NapariQtNotification):
            toast.close()

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def replay_metrics(plot, metrics_csv: Path) -> None:
    """Draw a finished run's curves from its metrics.csv into the Train dock's plot."""
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("kind") == "train":
                plot.add_losses(int(row["step"]), {k[5:]: float(v) for k, v in row.items()
                                                   if k.startswith("loss_") and v not in (None, "")})
            elif row.get("mIoU"):
                plot.add_miou(int(row["epoch"] or 0), float(row["mIoU"]))
    plot.flush()


#: Screen sizes the screenshots are taken at (a laptop and a desktop monitor).
SIZES = ((1366, 768), (1920, 1080))


def grab(viewer, path: Path) -> None:
    from PIL import Image

    settle(0.3)
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(path)
    print(path)


def shoot(size: tuple[int, int], checkpoint: Path, out: Path, slide: bool = True) -> None:
    """The four scenes at one window size: Segment dock with a segmented image and the class palette, the slide
    with a field-of-view result and a scale bar, the Train dock while it trains, and a QuPath import."""
    import tempfile

    import napari

    from napari_wsss_cram.core.io.png import read_index_png
    from napari_wsss_cram.core.io.qupath import labels_to_geojson
    from napari_wsss_cram.widgets.layers import result_layers_of

    tag = f"{size[0]}x{size[1]}"
    viewer = napari.Viewer(title="napari-wsss-cram", show=True)
    window = viewer.window._qt_window
    window.resize(*size)
    window.move(0, 0)
    settle(0.3)
    # 1. Segment dock: the sample patch segmented, the dock scrolled to the palette and composition table
    viewer.open_sample("napari-wsss-cram", "patch")
    image = next(layer for layer in viewer.layers if layer.rgb)
    _, segment = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    if not segment.set_checkpoint(checkpoint):
        raise SystemExit(f"error: {segment.message.text()}")
    segment.image_combo.setCurrentText(image.name)
    segment.region_combo.setCurrentText("Whole image")  # not the field of view of the previous size's slide
    segment.run()
    wait_for(lambda: not segment.busy)
    segment.update_composition()
    viewer.reset_view()
    segment.scroll_area.ensureWidgetVisible(segment.export_panel.composition_table)
    segment.scroll_area.ensureWidgetVisible(segment.export_panel.palette)
    grab(viewer, out / f"segment_dock_{tag}.png")

    # 2. QuPath import: the sample's true labels as QuPath would export them, imported onto the image
    from napari_wsss_cram._sample_data import sample_patch_paths

    truth = read_index_png(sample_patch_paths()[1])
    qupath = Path(tempfile.mkdtemp()) / "sample_patch.geojson"
    qupath.write_text(__import__("json").dumps(labels_to_geojson(truth, segment.info.classes)["features"]))
    for layer in list(viewer.layers):
        if layer is not image:
            viewer.layers.remove(layer)
    segment.import_qupath(qupath)
    wait_for(lambda: any(layer.name.startswith("qupath:") for layer in viewer.layers))
    settle(0.3)
    segment.scroll_area.ensureWidgetVisible(segment.export_panel.qupath_button)
    grab(viewer, out / f"qupath_import_{tag}.png")

    if slide:  # 3. The slide with a field-of-view result and napari's scale bar (µm)
        viewer.layers.clear()
        from napari_wsss_cram._sample_data import sample_slide_path

        sample_slide_path()  # generated here if needed (napari would generate it in the background)
        slide, _truth = viewer.open_sample("napari-wsss-cram", "slide")
        segment.image_combo.setCurrentText(slide.name)
        segment.region_combo.setCurrentText("Current field of view")
        segment.level_spin.setValue(0)
        viewer.camera.center = (512.0 * 0.25, 1536.0 * 0.25)  # a corner of the slide, 0.25 µm/px
        viewer.camera.zoom = 1.0 / 0.25 * 0.8
        viewer.scale_bar.visible = True
        settle(0.5)
        segment.run()
        wait_for(lambda: not segment.busy)
        [labels] = result_layers_of(viewer, slide.name, "labels")
        labels.opacity = 0.45
        for activation in result_layers_of(viewer, slide.name, "activation"):
            activation.visible = False  # the labels are the result shown here
        viewer.camera.zoom = viewer.camera.zoom * 0.6  # step back: the result sits inside the slide
        segment.tabs.setCurrentIndex(0)  # the settings tab: the Region row
        segment.scroll_area.ensureWidgetVisible(segment.region_combo)
        grab(viewer, out / f"slide_field_of_view_{tag}.png")

    # 4. Train dock while it trains (the sample preset on the sample patches), then cancelled
    viewer.layers.clear()
    viewer.window.remove_dock_widget("all")
    viewer.open_sample("napari-wsss-cram", "patch")
    _, train = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Train")
    train.preset_combo.setCurrentText("sample")
    train.data_row.setText(str(ROOT / "sample_data" / "patches"))
    train.val_row.setText(str(ROOT / "sample_data" / "validation"))
    train.out_row.setText(tempfile.mkdtemp(prefix="wsss-cram-shot-"))
    train.steps_spin.setValue(400)
    train.scan()
    train.start()
    wait_for(lambda: train.progress_bar.value() >= 12 or train.worker is None)
    train.scroll_area.ensureWidgetVisible(train.plot)
    grab(viewer, out / f"train_dock_{tag}.png")
    train.cancel()
    wait_for(lambda: train.worker is None)
    viewer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled demo model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES),
                        help="window sizes of the per-size scenes, e.g. 1366x768")
    parser.add_argument("--no-slide", action="store_true", help="skip the slide scene (it generates the slide)")
    args = parser.parse_args(argv)

    import napari
    from PIL import Image

    from napari_wsss_cram.core.resources import demo_model_path

    checkpoint = args.checkpoint or demo_model_path()
    if not checkpoint.is_file():
        print(f"error: no model at {checkpoint}; train the demo model first or pass --checkpoint.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-wsss-cram", show=True)
    viewer.window._qt_window.resize(1500, 980)  # a fixed size keeps the screenshots comparable
    viewer.open_sample("napari-wsss-cram", "patch")
    image = next(layer for layer in viewer.layers if layer.rgb)
    _, segment = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    if not segment.set_checkpoint(checkpoint):
        print(f"error: {segment.message.text()}", file=sys.stderr)
        return 2
    segment.image_combo.setCurrentText(image.name)
    segment.run()
    wait_for(lambda: not segment.busy)
    segment.update_composition()
    viewer.reset_view()
    settle()
    # the dock scrolls: show its lower half, where the palette and the composition table are
    segment.scroll_area.ensureWidgetVisible(segment.export_panel.copy_button)
    settle(0.2)
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(args.out / "segment_dock.png")

    # Montage: the image, the image with its CRF labels, then each class's activation map alone.
    from napari_wsss_cram.widgets.layers import result_layers_of, show_activation

    [labels] = result_layers_of(viewer, image.name, "labels")
    [activation] = result_layers_of(viewer, image.name, "activation")

    def show(*visible) -> None:
        for layer in [image, labels, activation]:
            layer.visible = layer in visible
        settle(0.3)

    tiles = []
    for visible in [(image,), (image, labels)]:
        show(*visible)
        tiles.append(Image.fromarray(viewer.export_figure(scale_factor=2, flash=False)).convert("RGB"))
    for name in segment.info.classes.names:  # each class's heatmap over the image
        show_activation(activation, name)
        show(image, activation)
        tiles.append(Image.fromarray(viewer.export_figure(scale_factor=2, flash=False)).convert("RGB"))
    show_activation(activation, segment.activation_combo.currentText())
    show(image, labels, activation)  # back to the dock's view
    gap = 8
    height = min(t.height for t in tiles)
    montage = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), (38, 41, 48))
    x = 0
    for tile in tiles:
        montage.paste(tile.crop((0, 0, tile.width, height)), (x, 0))
        x += tile.width + gap
    montage.thumbnail((2400, 700))
    montage.save(args.out / "activations.png")

    # Train dock: scan the sample patches and replay the model's own training curves.
    viewer.window.remove_dock_widget("all")
    _, train = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Train")
    train.preset_combo.setCurrentText("sample")
    train.data_row.setText(str(ROOT / "sample_data" / "patches"))
    train.val_row.setText(str(ROOT / "sample_data" / "validation"))
    train.out_row.setText(str(ROOT / "runs" / "demo"))
    train.scan()
    metrics = checkpoint.parent / "metrics.csv"
    if metrics.is_file():
        replay_metrics(train.plot, metrics)
        train.eta_label.setText(f"curves of {metrics.parent.name}/{metrics.name}")
    settle()
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(args.out / "train_dock.png")
    for name in ("segment_dock.png", "activations.png", "train_dock.png"):
        print(args.out / name)
    viewer.close()
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        shoot((width, height), checkpoint, args.out, slide=not args.no_slide)
    return 0


if __name__ == "__main__":
    sys.exit(main())
