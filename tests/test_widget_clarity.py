"""What confused a new user in the docks (issue 20, items 13-15), on a real viewer under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsss_cram.core.classes import WSSS4LUAD

pytestmark = pytest.mark.gui
PLUGIN = "napari-wsss-cram"


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))


def test_key_help_shows_the_class_keys_not_napari_digits(make_napari_viewer):
    """napari's key help (status bar) listed <1> erase, <3> polygon, <4> fill while 1-3 paint classes here."""
    from napari_wsss_cram.widgets.layers import add_result_layers

    viewer = make_napari_viewer()
    image = viewer.add_image(np.full((20, 20, 3), 200, np.uint8), name="patch", rgb=True)
    layer = add_result_layers(viewer, image, np.zeros((20, 20), np.uint8), None, WSSS4LUAD)["labels"]
    viewer.layers.selection.active = layer
    for mode in ("paint", "fill", "erase", "pan_zoom"):
        layer.mode = mode
        for text in (layer.help, viewer.help):
            assert "<1> tumor" in text and "<2> stroma" in text and "<3> normal" in text and "<0> background" in text
            assert not any(f"use <{d}>" in text for d in "1234567")  # napari's digit meanings are gone
    assert "use <F> for" in layer.help or layer.mode == "fill"
    # a plain labels layer keeps napari's own help
    other = viewer.add_labels(np.zeros((5, 5), np.uint8), name="other")
    other.mode = "paint"
    assert "<1> tumor" not in other.help
