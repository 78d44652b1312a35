"""Issue 20's three 1366x768 screenshots (synthetic data only; needs Xvfb or a display):

- ``docs/segment_dock_maps_1366x768.png``: the sample patch segmented by the Segment dock, the tumor activation
  map shown under the labels (drawn as class outlines while a map is visible);
- ``docs/train_dock_training_1366x768.png``: the Train dock while it trains on the sample patches;
- ``docs/qupath_import_1366x768.png``: the sample's true labels as a QuPath GeoJSON, imported in the background.

Usage: python docs/make_issue20_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

if os.environ.get("QT_QPA_PLATFORM") == "offscreen" and os.environ.get("DISPLAY"):
    del os.environ["QT_QPA_PLATFORM"]  # vispy draws nothing into a grab on Qt's offscreen platform

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "docs"))
    import napari
    from make_screenshots import grab, settle, wait_for

    from napari_wsss_cram._sample_data import sample_patch_paths
    from napari_wsss_cram.core.io.png import read_index_png
    from napari_wsss_cram.core.io.qupath import labels_to_geojson
    from napari_wsss_cram.core.resources import demo_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    viewer = napari.Viewer(title="napari-wsss-cram", show=True)
    window = viewer.window._qt_window
    window.resize(1366, 768)
    window.move(0, 0)
    settle(0.3)
    # 1. Segment dock after a run: the tumor map under the labels' outlines
    viewer.open_sample("napari-wsss-cram", "patch")
    image = next(layer for layer in viewer.layers if layer.rgb)
    _, segment = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    if not segment.set_checkpoint(demo_model_path()):
        raise SystemExit(f"error: {segment.message.text()}")
    segment.image_combo.setCurrentText(image.name)
    segment.region_combo.setCurrentText("Whole image")
    segment.run()
    wait_for(lambda: not segment.busy)
    segment.opacity_slider.setValue(70)
    segment.tabs.setCurrentIndex(0)  # the Segment tab: the activation map's class and opacity
    segment.scroll_area.ensureWidgetVisible(segment.opacity_slider)
    viewer.reset_view()
    grab(viewer, args.out / "segment_dock_maps_1366x768.png")

    # 2. QuPath import: the sample's true labels as QuPath would export them
    truth = read_index_png(sample_patch_paths()[1])
    qupath = Path(tempfile.mkdtemp()) / "sample_patch.geojson"
    qupath.write_text(json.dumps(labels_to_geojson(truth, segment.info.classes)["features"]))
    for layer in list(viewer.layers):
        if layer is not image:
            viewer.layers.remove(layer)
    segment.import_qupath(qupath)
    wait_for(lambda: any(layer.name.startswith("qupath:") for layer in viewer.layers))
    settle(0.3)
    segment.scroll_area.ensureWidgetVisible(segment.export_panel.qupath_button)
    grab(viewer, args.out / "qupath_import_1366x768.png")

    # 3. Train dock while it trains (the sample preset on the sample patches), then cancelled
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
    settle(1.5)  # the plot draws at most once a second
    train.scroll_area.ensureWidgetVisible(train.plot)
    grab(viewer, args.out / "train_dock_training_1366x768.png")
    train.cancel()
    wait_for(lambda: train.worker is None)
    viewer.close()


if __name__ == "__main__":
    main()
