"""Export time of a whole-slide result: the synthetic sample slide's 4096² truth labels written as PNG, pyramidal
OME-TIFF and QuPath GeoJSON through the dock's writer (``_writer.export_labels``, which the Segment dock runs in a
worker thread). Prints seconds and file size per format.

    .venv/bin/python benchmarks/export_time.py [--out DIR] [--repeats 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from napari_wsss_cram._sample_data import MASK_NAME, sample_slide_path
    from napari_wsss_cram._writer import export_labels
    from napari_wsss_cram.core.classes import WSSS4LUAD
    from napari_wsss_cram.core.io.images import ImageSource
    from napari_wsss_cram.core.placement import Placement

    slide = sample_slide_path()  # generated into the cache once (about 20 s)
    with ImageSource.open(slide) as source:
        mpp = source.mpp
    with warnings.catch_warnings():  # the truth mask is a grayscale TIFF: read as pixels, not as H&E
        warnings.simplefilter("ignore")
        with ImageSource.open(slide.parent / MASK_NAME) as mask:
            labels = np.asarray(mask.read_region(0, 0, *mask.shape[:2]))
    labels = labels[..., 0] if labels.ndim == 3 else labels
    print(f"labels {labels.shape[1]}x{labels.shape[0]} px at {mpp} µm/px, classes {np.unique(labels).tolist()}")
    out = args.out or Path(tempfile.mkdtemp(prefix="wsss_export_"))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("slide.png", "slide.ome.tif", "slide.geojson"):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            path = export_labels(out / name, labels, WSSS4LUAD, mpp=mpp, placement=Placement(mpp0=mpp))
            times.append(time.perf_counter() - t0)
        size = Path(path).stat().st_size / 2**20
        print(f"{name:15s} {min(times):6.2f} s (min of {args.repeats})  {size:6.2f} MiB")


if __name__ == "__main__":
    main()
