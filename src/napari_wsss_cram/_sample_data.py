"""npe2 sample data: a committed synthetic validation patch (with its truth) and the synthetic slide.

The slide is not committed: on first use it is generated into the user cache folder (a minute or so; in napari in
a background thread, with a progress bar that says the time left, while a grey placeholder marks where it will
appear), or taken from ``sample_data/slide/`` of a source checkout when ``wsss-cram make-sample-data`` made it there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
#: sample_data/ of a source checkout (editable install); wheels ship no sample images.
CHECKOUT_SAMPLE_DATA = PACKAGE_DIR.parents[1] / "sample_data"
SLIDE_NAME = "sample_slide.ome.tif"
MASK_NAME = "sample_slide_mask.ome.tif"
PATCH_NAME = "00.png"
#: Side of the generated sample slide (tests lower it to stay fast).
SLIDE_SIZE = 4096


def cache_dir() -> Path:
    """Where generated sample data lives: $WSSS_CRAM_CACHE or the platform's user cache folder."""
    env = os.environ.get("WSSS_CRAM_CACHE")
    if env:
        return Path(env)
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # pragma: no cover - platformdirs comes with napari
        return Path.home() / ".cache" / "napari-wsss-cram"
    return Path(user_cache_dir("napari-wsss-cram"))


def sample_patch_paths() -> tuple[Path, Path]:
    """(image, mask) of the sample patch: the committed validation image, or one generated into the cache."""
    img = CHECKOUT_SAMPLE_DATA / "validation" / "img" / PATCH_NAME
    mask = CHECKOUT_SAMPLE_DATA / "validation" / "mask" / PATCH_NAME
    if img.is_file() and mask.is_file():
        return img, mask
    cached = cache_dir() / "validation"
    img, mask = cached / "img" / PATCH_NAME, cached / "mask" / PATCH_NAME
    if not (img.is_file() and mask.is_file()):
        from .core.sample import make_sample_data

        make_sample_data(cache_dir(), n_patches=0, n_validation=1, slide_size=0)
    return img, mask


def ready_slide_path(size: int | None = None) -> tuple[Path, bool]:
    """(where the synthetic slide of ``size`` is or will be, True when it is there already)."""
    size = size or SLIDE_SIZE
    checkout = CHECKOUT_SAMPLE_DATA / "slide" / SLIDE_NAME
    if size == 4096 and checkout.is_file() and (checkout.parent / MASK_NAME).is_file():
        return checkout, True
    path = cache_dir() / f"slide-{size}" / SLIDE_NAME
    return path, path.is_file() and (path.parent / MASK_NAME).is_file()


def sample_slide_path(size: int | None = None) -> Path:
    """The synthetic pyramidal slide, generated into the cache folder on first use (here, synchronously)."""
    size = size or SLIDE_SIZE
    path, ready = ready_slide_path(size)
    if not ready:
        from .core.sample import make_slide

        with _progress_in_napari(f"WSSS-CRAM: generating the synthetic slide once, cached in "
                                 f"{path.parent}") as report:
            make_slide(path, size=size, seed=0, mask_path=path.parent / MASK_NAME, progress=report)
    return path


@contextlib.contextmanager
def _progress_in_napari(text: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback that shows ``text`` and a progress bar in napari while the caller works.

    napari calls sample-data functions on its GUI thread and waits for their layers, so the work cannot move to
    a worker; instead the window repaints (no user input: nothing can start meanwhile) at each step, so the
    user sees what happens instead of a frozen window. Outside napari it does nothing.
    """
    try:
        from napari.utils import progress
        from napari.utils.notifications import show_info
        from qtpy.QtCore import QEventLoop
        from qtpy.QtWidgets import QApplication
    except ImportError:  # headless use (tests, scripts): nothing to show
        yield lambda done, total: None
        return
    app = QApplication.instance()

    def repaint() -> None:
        if app is not None:
            app.processEvents(QEventLoop.ExcludeUserInputEvents)

    show_info(text)
    with progress(total=1, desc="WSSS-CRAM sample slide") as bar:
        repaint()

        def report(done: int, total: int) -> None:
            bar.total = max(total, 1)
            bar.n = done
            bar.refresh()
            repaint()

        yield report


def sample_patch() -> list[tuple[Any, dict, str]]:
    """A synthetic H&E patch and its true tissue labels."""
    from ._reader import read_layer

    img, mask = sample_patch_paths()
    image = read_layer(img)
    image[1]["name"] = "synthetic H&E patch"
    labels = read_layer(mask)
    labels[1]["name"] = "synthetic H&E patch truth"
    labels[1]["opacity"] = 0.4
    labels[1]["visible"] = False
    return [image, labels]


#: Name of the layer that marks where the slide appears while it is generated.
PLACEHOLDER_NAME = "synthetic H&E slide (generating…)"
SLIDE_MPP = 0.25
_generating: dict[str, Any] = {}  # the background generation in progress (napari): its thread and relay


def sample_slide() -> list[tuple[Any, dict, str]]:
    """The synthetic 4096x4096 slide as a lazy multiscale image (0.25 µm/px), with its truth labels.

    In napari with no slide generated yet, it is generated in a background thread (napari stays responsive) and
    a grey placeholder layer is returned at once; the slide replaces it when ready.
    """
    from ._reader import read_layer

    path, ready = ready_slide_path()
    if not ready:
        viewer = _napari_viewer()
        if viewer is not None:
            return [_generate_in_background(viewer, path, SLIDE_SIZE)]
    path = sample_slide_path()
    image = read_layer(path)
    image[1]["name"] = "synthetic H&E slide"
    labels = read_layer(path.parent / MASK_NAME)
    labels[1].update(name="synthetic H&E slide truth", opacity=0.4, visible=False)
    return [image, labels]


def _napari_viewer():
    """The current napari viewer when called from napari's GUI thread with a Qt application, else None."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import napari
        from qtpy.QtWidgets import QApplication
    except ImportError:  # headless use: generate synchronously
        return None
    return napari.current_viewer() if QApplication.instance() is not None else None


def _generate_in_background(viewer, path: Path, size: int) -> tuple[Any, dict, str]:
    """Start generating the slide in a thread (once), with a progress bar saying the time left; return the
    placeholder layer. When the slide is ready the placeholder goes and the sample opens from the cache."""
    import threading
    import time

    import numpy as np
    from napari.utils import progress
    from napari.utils.notifications import show_error, show_info
    from qtpy.QtCore import QObject, Signal

    extent = size * SLIDE_MPP  # µm: the placeholder covers the slide to come
    placeholder = (np.full((64, 64, 3), 225, np.uint8),
                   {"name": PLACEHOLDER_NAME, "rgb": True, "scale": (extent / 64, extent / 64), "units": ("µm", "µm"),
                    "metadata": {"wsss_cram_placeholder": True}}, "image")
    if _generating:  # a second click while it runs: the same generation goes on
        return placeholder

    class Relay(QObject):  # a worker-thread call becomes a GUI-thread slot (queued signals)
        advanced = Signal(int, int)
        finished = Signal(str)

    relay = Relay()
    bar = progress(total=1, desc="WSSS-CRAM sample slide")
    started = time.monotonic()

    def on_advanced(done: int, total: int) -> None:
        bar.total = max(total, 1)
        bar.n = done
        if 0 < done < total:  # the estimate from the pace so far: true by construction
            left = (time.monotonic() - started) / done * (total - done)
            bar.set_description(f"WSSS-CRAM sample slide: about {int(left) + 1} s left")
        bar.refresh()

    def on_finished(error: str) -> None:
        bar.close()
        _generating.clear()
        for layer in [ly for ly in viewer.layers if ly.metadata.get("wsss_cram_placeholder")]:
            viewer.layers.remove(layer)
        if error:
            show_error(f"The synthetic slide could not be generated into {path.parent}: {error}")
            return
        viewer.open_sample("napari-wsss-cram", "slide")  # from the cache now

    relay.advanced.connect(on_advanced)
    relay.finished.connect(on_finished)

    def work() -> None:
        from .core.sample import make_slide

        try:
            make_slide(path, size=size, seed=0, mask_path=path.parent / MASK_NAME,
                       progress=lambda done, total: relay.advanced.emit(int(done), int(total)))
        except Exception as err:  # reported in napari, never lost in a thread
            relay.finished.emit(str(err) or type(err).__name__)
            return
        relay.finished.emit("")

    thread = threading.Thread(target=work, name="wsss-cram sample slide", daemon=True)
    _generating.update(thread=thread, relay=relay, bar=bar)
    show_info(f"WSSS-CRAM: generating the synthetic slide once, in the background (the progress bar says the time "
              f"left); it replaces the grey placeholder when ready. Cached in {path.parent}.")
    thread.start()
    return placeholder
