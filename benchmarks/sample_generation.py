"""Speed and peak memory of the synthetic H&E generator (core/sample.py).

Prints CPU seconds per megapixel for mixed-tissue regions, and the time and peak RSS of writing a
pyramidal OME-TIFF slide (+ mask) tile by tile, in the default and the periodic-texture mode:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sample_generation.py --size 4096 --dir /tmp/wsss-sample
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="slide side in pixels (default 4096)")
    parser.add_argument("--dir", default=None, help="where the slides go (default: a temporary folder)")
    args = parser.parse_args()

    from napari_wsss_cram.core.sample import TissueLayout, make_slide, render_region

    layout = TissueLayout(seed=5, region_scale=150)
    start = time.process_time()
    for i in range(4):
        render_region(layout, 0, 1024 * i, 1024, 1024)
    print(f"render_region, mixed tissue: {(time.process_time() - start) / 4:.2f} CPU s per megapixel")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        for period in (None, 1024):
            wall, cpu = time.perf_counter(), time.process_time()
            slide, mask = make_slide(folder / f"slide{args.size}-{period}.ome.tif", size=args.size,
                                     texture_period=period)
            mp = args.size * args.size / 1e6
            cpu_s = time.process_time() - cpu
            print(f"make_slide {args.size}x{args.size} texture_period={period}: {time.perf_counter() - wall:.1f} s "
                  f"wall, {cpu_s:.1f} CPU s ({mp / cpu_s:.2f} MP per CPU s), "
                  f"{slide.stat().st_size / 2**20:.1f} MiB + mask {mask.stat().st_size / 2**20:.1f} MiB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
