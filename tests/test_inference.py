"""The inference engine: tiling equivalence, geometry across levels, streaming, tissue skipping, cancel, OOM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.errors import ImageReadError, OutOfMemoryError, WsssCramError
from napari_wsss_cram.core.inference import PredictSettings, predict_array, predict_path, predict_source
from napari_wsss_cram.core.io.images import ImageSource
from napari_wsss_cram.core.io.ometiff import write_pyramidal_ome_tiff
from napari_wsss_cram.core.progress import Cancelled, CancelToken, drive
from napari_wsss_cram.core.tiling import Geometry, tile_starts

BACKGROUND = WSSS4LUAD.background_index


class TinyNet(nn.Module):
    """A small convolutional net with the engine's ``predict`` contract (receptive field 5 px)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, k + 1, 3, padding=1)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = 3.0 * self.c2(torch.relu(self.c1(x)))
        return z.softmax(1), torch.sigmoid(z)


class ColorNet(nn.Module):
    """Per-pixel colour classifier: red -> tumor, green -> stroma, blue -> normal, white -> background.

    Its answer is known at every pixel, so it checks where the engine puts outputs, not just their shape.
    """

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        rgb = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor(
            [0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        white = rgb.min(dim=1, keepdim=True).values
        logits = torch.cat([rgb - white, 3.0 * white - 2.0], dim=1) * 20.0
        return logits.softmax(1), None


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = torch.tensor(rng.random((h, w, 3)) * 200.0, dtype=torch.float32).permute(2, 0, 1)[None]
    img = nn.functional.avg_pool2d(img, 5, 1, 2)[0].permute(1, 2, 0).numpy()
    return img.astype(np.uint8)


def colour_blocks(h: int, w: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of red/green/blue/white blocks and its true labels."""
    colours = np.array([[220, 20, 20], [20, 220, 20], [20, 20, 220], [255, 255, 255]], np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    labels = ((yy // block) * 3 + (xx // block) * 5 + (yy // (2 * block))) % 4
    return colours[labels], labels.astype(np.uint8)


def run(gen, events=None):
    return drive(gen, None if events is None else events.append)


# ----------------------------------------------------------------------------------------- geometry
def test_tile_starts_cover_with_overlap_and_padding():
    starts, size = tile_starts(0, 1000, 256, 64)
    assert size == 256 and starts[0] == -32 and starts[-1] + size == 1000 + 32
    gaps = np.diff(starts)
    assert gaps.max() <= 256 - 64  # every pair shares at least the overlap
    starts, size = tile_starts(0, 100, 512, 64)  # a patch: one tile, just big enough, still padded
    assert len(starts) == 1 and size % 8 == 0 and starts[0] <= -32 and starts[0] + size >= 132


def test_geometry_block_centres():
    geom = Geometry(d_read=1.0, d_out=1.0, f=2.5)
    # output pixel o has its centre at work coordinate (o + 0.5) * 2.5 - 0.5
    np.testing.assert_allclose(geom.block_centres_in_work(10, 3, 1), [(10.5 + i) * 2.5 - 0.5 for i in range(3)])
    coarse = Geometry(d_read=4.0, d_out=1.0, f=1.0)  # work pixel = 4 output pixels
    np.testing.assert_allclose(coarse.block_centres_in_work(0, 2, 4), [0.0, 1.0])


# ----------------------------------------------------------------------------------------- engine
def test_tiled_equals_whole_image():
    img = smooth_image(150, 205)
    model = TinyNet()
    whole = run(predict_array(model, None, img, PredictSettings(scale=2.5, tile=4096, with_cam=True)))
    events = []
    tiled = run(predict_array(model, None, img, PredictSettings(scale=2.5, tile=96, overlap=32, batch=3,
                                                                with_cam=True)), events)
    assert whole.info["tiles"] == 1 and tiled.info["tiles"] > 20
    assert whole.labels.shape == tiled.labels.shape == (150, 205) and whole.labels.dtype == np.uint8
    assert whole.probs.shape == (4, 150, 205) and whole.cam.shape == (4, 150, 205)
    assert np.abs(whole.probs.astype(int) - tiled.probs).max() <= 3  # probabilities x 255
    assert np.abs(whole.cam.astype(int) - tiled.cam).max() <= 3
    assert (whole.labels == tiled.labels).mean() > 0.998
    assert events[0].done == 0 and events[-1].done == events[-1].total == tiled.info["tiles"]
    assert all(e.phase == "predict" for e in events)
    assert sum(whole.class_pixels.values()) == 150 * 205


def test_tiled_equals_whole_with_crf():
    img, _ = colour_blocks(120, 120, 30)
    img = np.clip(img.astype(int) + np.random.default_rng(1).integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
    settings = dict(crf=True, scale=1.0, tissue_threshold=None)
    whole = run(predict_array(TinyNet(), None, img, PredictSettings(tile=1024, **settings)))
    tiled = run(predict_array(TinyNet(), None, img, PredictSettings(tile=64, overlap=32, **settings)))
    assert whole.info["crf_seconds"] > 0 and tiled.info["crf_seconds"] > 0
    assert (whole.labels == tiled.labels).mean() > 0.99


def test_crf_backends_give_the_same_labels():
    """The engine's batched torch CRF (on the model's device) and the per-tile pydensecrf reference agree."""
    from napari_wsss_cram.core.crf import CRFParams

    img, _ = colour_blocks(120, 120, 30)
    img = np.clip(img.astype(int) + np.random.default_rng(2).integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
    labels = {}
    for backend in ("torch", "pydensecrf"):
        settings = PredictSettings(tile=64, overlap=32, batch=4, crf=True, crf_params=CRFParams(backend=backend),
                                   scale=1.0, tissue_threshold=None)
        pred = run(predict_array(TinyNet(), None, img, settings))
        assert pred.info["crf_seconds"] > 0
        labels[backend] = pred.labels
    assert (labels["torch"] == labels["pydensecrf"]).mean() > 0.99


def test_outputs_land_on_the_right_pixels_from_another_level(tmp_path):
    """--mpp reads a coarser pyramid level; labels mapped back to level 0 and level 1 stay aligned."""
    img, truth = colour_blocks(512, 384, 64)
    path = tmp_path / "slide.ome.tif"
    write_pyramidal_ome_tiff(path, img, mpp=0.5, tile=128)
    with ImageSource.open(path) as src:
        assert src.n_levels >= 2
        pred = run(predict_source(ColorNet(), None, src, PredictSettings(mpp=1.0, tile=128, overlap=32)))
        assert pred.info["read_level"] == 1 and pred.info["work_scale"] == pytest.approx(1.0)
        assert pred.labels.shape == (512, 384) and pred.mpp == pytest.approx(0.5) and pred.scale == (1.0, 1.0)
        assert (pred.labels == truth).mean() > 0.97  # only block edges may differ
        lvl1 = run(predict_source(ColorNet(), None, src, PredictSettings(scale=1.0, output_level=1, tile=128)))
        assert lvl1.labels.shape == src.level_shapes[1] and lvl1.scale == (2.0, 2.0)
        assert lvl1.mpp == pytest.approx(1.0)
        assert (lvl1.labels == truth[::2, ::2]).mean() > 0.95
        # Work grid 4x coarser than the output: blended on 4x4 blocks, still aligned at level 0.
        coarse = run(predict_source(ColorNet(), None, src, PredictSettings(mpp=2.0, tile=64, overlap=16)))
        assert coarse.info["blend_block"] == 4 and coarse.labels.shape == (512, 384)
        assert (coarse.labels == truth).mean() > 0.95
        # A field-of-view region: translate places it in level-0 coordinates.
        fov = run(predict_source(ColorNet(), None, src, PredictSettings(scale=2.5, tile=128), region=(64, 32, 96, 80)))
        assert fov.labels.shape == (96, 80) and fov.translate == (64.0, 32.0)
        assert (fov.labels == truth[64:160, 32:112]).mean() > 0.97


def test_streamed_prediction_equals_in_memory(tmp_path):
    img = smooth_image(90, 130, seed=3)
    settings = dict(tile=64, overlap=16, with_cam=True)
    mem = run(predict_array(TinyNet(), None, img, PredictSettings(**settings)))
    disk = run(predict_array(TinyNet(), None, img, PredictSettings(stream_threshold_mp=0.0, work_dir=str(tmp_path),
                                                                   **settings)))
    assert disk.streamed and not mem.streamed and disk.store_dir.parent == tmp_path
    assert not isinstance(disk.labels, np.ndarray)  # a disk-backed (zarr) array
    np.testing.assert_array_equal(np.asarray(disk.labels), mem.labels)
    np.testing.assert_array_equal(np.asarray(disk.probs), mem.probs)
    np.testing.assert_array_equal(np.asarray(disk.cam), mem.cam)
    disk.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_background_tiles_are_skipped():
    img = np.full((200, 200, 3), 250, np.uint8)
    img[:, :60] = (150, 60, 150)  # tissue on the left only
    # background="model": without a threshold there is no tissue mask either, so compare like with like
    pred = run(predict_array(TinyNet(), None, img, PredictSettings(scale=1.0, tile=64, overlap=16,
                                                                   background="model")))
    assert 0 < pred.info["skipped_tiles"] < pred.info["tiles"]
    assert (pred.labels[:, 120:] == BACKGROUND).all()
    everything = run(predict_array(TinyNet(), None, img, PredictSettings(scale=1.0, tile=64, overlap=16,
                                                                         tissue_threshold=None,
                                                                         background="model")))
    assert everything.info["skipped_tiles"] == 0
    np.testing.assert_array_equal(everything.labels[:, :40], pred.labels[:, :40])


def test_cancel_stops_and_removes_the_store(tmp_path):
    token = CancelToken()
    gen = predict_array(TinyNet(), None, smooth_image(100, 100), PredictSettings(
        scale=1.0, tile=32, overlap=8, batch=1, stream_threshold_mp=0.0, work_dir=str(tmp_path)), token)
    next(gen)
    next(gen)
    assert list(tmp_path.iterdir())  # the disk-backed store exists while running
    token.cancel()
    with pytest.raises(Cancelled):
        drive(gen)
    assert list(tmp_path.iterdir()) == []


class OomAboveOne(TinyNet):
    """Raises the CUDA out-of-memory error for batches above ``limit`` tiles."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def predict(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return super().predict(x)


def test_out_of_memory_halves_the_batch():
    img = smooth_image(80, 80)
    ref = run(predict_array(TinyNet(), None, img, PredictSettings(scale=1.0, tile=32, overlap=8, batch=8)))
    pred = run(predict_array(OomAboveOne(2), None, img, PredictSettings(scale=1.0, tile=32, overlap=8, batch=8)))
    assert pred.info["batch"] == 2 and "retrying with batches of 4" in pred.info["messages"][0]
    np.testing.assert_array_equal(pred.labels, ref.labels)
    with pytest.raises(OutOfMemoryError, match="smaller --tile"):
        run(predict_array(OomAboveOne(0), None, img, PredictSettings(scale=1.0, tile=32, overlap=8, batch=4)))


def test_bad_inputs_give_clear_errors(tmp_path):
    model = TinyNet()
    with pytest.raises(ImageReadError, match="empty"):
        run(predict_array(model, None, np.zeros((0, 10, 3), np.uint8)))
    with pytest.raises(ImageReadError, match="at least 8x8"):
        run(predict_array(model, None, np.zeros((1, 1, 3), np.uint8)))
    with pytest.warns(UserWarning, match="grayscale"):
        gray = run(predict_array(model, None, smooth_image(40, 40)[..., 0]))
    assert gray.labels.shape == (40, 40)
    empty_file = tmp_path / "empty.tif"
    empty_file.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        run(predict_path(model, None, empty_file))
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        run(predict_path(model, None, not_image))
    tif = tmp_path / "cut.ome.tif"
    write_pyramidal_ome_tiff(tif, smooth_image(256, 256), tile=64)
    data = tif.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        run(predict_path(model, None, truncated))
    with pytest.raises(WsssCramError, match="overlap"):
        run(predict_array(model, None, smooth_image(40, 40), PredictSettings(tile=64, overlap=48)))
    with pytest.raises(ImageReadError, match="pixel size"):
        run(predict_array(model, None, smooth_image(40, 40), PredictSettings(mpp=1.0)))


def test_band_accumulator_holds_one_tile_of_rows():
    """Memory does not grow with the image height: finished rows leave the band as tiles move down."""
    from napari_wsss_cram.core.tiling import BandAccumulator, RowSink

    height, width, tile, stride = 1000, 40, 64, 48
    labels = np.full((height, width), 99, np.uint8)
    acc = BandAccumulator(height, width, 2, RowSink(labels), with_cam=False, background_index=1)
    held = []
    starts = [min(y, height - tile) for y in range(0, height - tile + stride, stride)]
    for i, y0 in enumerate(starts):
        probs = np.zeros((2, tile, width), np.float32)
        probs[i % 2] = 1.0
        acc.add(y0, 0, probs, np.ones((tile, width), np.float32))
        acc.advance(starts[i + 1] if i + 1 < len(starts) else height)  # no later tile reaches above it
        held.append(acc.wsum.shape[0])
    acc.finish()
    assert max(held) <= tile
    assert (labels != 99).all() and set(np.unique(labels)) == {0, 1}
    assert acc.class_pixels.sum() == height * width


# ----------------------------------------------------------------------------------------- seams (bug 10)
class RedGreenNet(nn.Module):
    """Tumor vs stroma from the red-green difference, softly: an ambiguous tissue whose class drifts slowly."""

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        rgb = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor(
            [0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        p = torch.sigmoid((rgb[:, 0:1] - rgb[:, 1:2]) * 10.0)
        zero = torch.zeros_like(p)
        return torch.cat([p, 1 - p, zero, zero], 1), None


def ambiguous_gradient(n: int = 192) -> np.ndarray:
    """Reddish to greenish along the diagonal, colours close enough for the CRF's bilateral kernel to join them."""
    yy, xx = np.mgrid[0:n, 0:n]
    t = (yy + xx) / (2 * n - 2) - 0.5
    rng = np.random.default_rng(0)
    red, green = 150 + 20 * t + rng.normal(0, 3, t.shape), 150 - 20 * t + rng.normal(0, 3, t.shape)
    return np.clip(np.stack([red, green, np.full_like(red, 150.0)], -1), 0, 255).astype(np.uint8)


def test_crf_leaves_no_seams_along_tile_borders(monkeypatch):
    """Bug 10: a CRF on each tile settles an ambiguous region per tile, and the near one-hot results meet in a
    straight line along the tile border; the CRF on the assembled map leaves no trace of the tiles."""
    from napari_wsss_cram.core.inference import plan as inference_plan
    from napari_wsss_cram.core.inference import plan_tiles
    from napari_wsss_cram.core.tiling import seam_profile

    img = ambiguous_gradient()
    settings = PredictSettings(scale=1.0, tile=64, overlap=16, crf=True, tissue_threshold=None)
    borders = plan_tiles(RedGreenNet(), None, ImageSource.from_array(img), settings, None).tile_borders()
    assert len(borders[0]) == len(borders[1]) == 4  # 5 x 5 tiles
    whole = run(predict_array(RedGreenNet(), None, img, PredictSettings(
        scale=1.0, tile=512, overlap=16, crf=True, tissue_threshold=None)))
    assert whole.info["tiles"] == 1 and whole.info["crf_on"] == "tiles"
    monkeypatch.setattr(inference_plan, "_CRF_PER_TILE", True)  # the behaviour before the fix: the cause reproduced
    per_tile = run(predict_array(RedGreenNet(), None, img, settings)).labels
    before = seam_profile(per_tile, *borders)
    assert max(p["border_max"] for p in before.values()) > 5 * max(p["other_max"] for p in before.values())
    monkeypatch.setattr(inference_plan, "_CRF_PER_TILE", False)
    fixed = run(predict_array(RedGreenNet(), None, img, settings))
    assert fixed.info["crf_on"] == "assembled map" and fixed.info["tiles"] == 25
    after = seam_profile(fixed.labels, *borders)
    for profile in after.values():
        assert profile["border_max"] <= profile["other_max"] + 2 and profile["ratio"] <= 3.0
    assert (fixed.labels == whole.labels).mean() > max(0.97, (per_tile == whole.labels).mean())
    assert sum(fixed.class_pixels.values()) == img.shape[0] * img.shape[1]
    assert fixed.class_pixels["tumor"] == int((fixed.labels == 0).sum())


def test_crf_on_the_assembled_map_streams_like_in_memory(tmp_path):
    img = ambiguous_gradient(160)
    settings = dict(scale=1.0, tile=64, overlap=16, crf=True, with_probs=False)
    mem = run(predict_array(RedGreenNet(), None, img, PredictSettings(**settings)))
    events = []
    disk = run(predict_array(RedGreenNet(), None, img, PredictSettings(
        stream_threshold_mp=0.0, work_dir=str(tmp_path), **settings)), events)
    assert disk.streamed and mem.probs is None and disk.probs is None  # allocated for the CRF, not returned
    np.testing.assert_array_equal(np.asarray(disk.labels), mem.labels)
    assert disk.class_pixels == mem.class_pixels
    assert events[-1].done == events[-1].total == disk.info["tiles"] + 1  # tiles, then one CRF window
    disk.cleanup()
