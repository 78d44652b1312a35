"""Tile seams (issue 12, bug 10): class changes per column and per row of a slide result, at tile borders vs
elsewhere, before and after the fix.

Segments the plugin's synthetic sample slide (generated into the cache on first use, ~20 s) with the demo model
at the Segment dock's defaults (tile 512, overlap 64, CRF on, background = no tissue, no class gating, batch 1
on the CPU; scale 2.5 as in the report, ``--scale`` to change it), once with the CRF on each tile (the behaviour
before the fix, kept reachable for this measurement only) and once with the CRF on the assembled map, and
prints for columns and rows: the most class changes on a line within 3 px of a tile border, the most elsewhere,
the median over all lines, and border max / median. A seam is a border line far above the others. A third,
untiled run (one tile over the whole field; no seam possible) shows what the slide's own structure gives.

The whole 4096x4096 slide at scale 2.5 is ~530 tiles (15+ min on 2 CPU cores with the per-tile CRF), so by
default a 1024x1024 field of view of level 0 is segmented (36 tiles); ``--region all`` does the whole slide.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/seams.py                       # field at (1024, 1024)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/seams.py --region 0,0,4096,4096 --level 0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled demo model)")
    parser.add_argument("--slide", default=None, help="default: the plugin's synthetic sample slide")
    parser.add_argument("--region", default="1024,1024,1024,1024", help="y,x,h,w in output-level pixels, or 'all'")
    parser.add_argument("--level", type=int, default=0, help="output level")
    parser.add_argument("--scale", type=float, default=2.5)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--only", choices=("before", "after"), default=None)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the untiled reference run (one tile over the whole region: no seams possible)")
    args = parser.parse_args()

    import torch

    from napari_wsss_cram._sample_data import sample_slide_path
    from napari_wsss_cram.core.checkpoint import load_checkpoint
    from napari_wsss_cram.core.inference import PredictSettings, plan_tiles, predict_source
    from napari_wsss_cram.core.inference import plan as inference_plan
    from napari_wsss_cram.core.io.images import ImageSource
    from napari_wsss_cram.core.progress import drive
    from napari_wsss_cram.core.tiling import seam_profile

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from napari_wsss_cram.core.resources import demo_model_path

    model, info = load_checkpoint(args.model or demo_model_path())
    slide = Path(args.slide) if args.slide else sample_slide_path()
    region = None if args.region == "all" else tuple(int(v) for v in args.region.split(","))
    settings = PredictSettings(scale=args.scale, tile=args.tile, overlap=args.overlap, batch=1, crf=True,
                               crf_isolated=False, output_level=args.level, with_cam=True)
    print(f"slide {slide.name}, region {region or 'all'} of level {args.level}, scale {args.scale}, "
          f"tile {args.tile}, overlap {args.overlap}, CRF on, torch threads {torch.get_num_threads()}")
    with ImageSource.open(slide) as source:
        borders = plan_tiles(model, info, source, settings, region).tile_borders()
        print(f"tile borders (output px): rows {[round(b, 1) for b in borders[0]]}, "
              f"columns {[round(b, 1) for b in borders[1]]}")
        for label, per_tile in (("before (CRF per tile)", True), ("after (CRF on the assembled map)", False)):
            if args.only and (args.only == "before") != per_tile:
                continue
            inference_plan._CRF_PER_TILE = per_tile
            t0 = time.perf_counter()
            pred = drive(predict_source(model, info, source, settings, region))
            seconds = time.perf_counter() - t0
            stats = seam_profile(pred.labels, *borders)
            print(f"{label}: {seconds:.1f} s ({pred.info['tiles']} tiles, {pred.info['skipped_tiles']} skipped, "
                  f"CRF {pred.info['crf_seconds']:.1f} s)")
            for name, s in stats.items():
                print(f"  {name:7s} border max {s['border_max']:5.0f}   elsewhere max {s['other_max']:5.0f}   "
                      f"median {s['median']:5.1f}   border max / median {s['ratio']:5.1f}")
            pred.cleanup()
        inference_plan._CRF_PER_TILE = False
        h, w = (region[2], region[3]) if region else source.level_shapes[args.level]
        if not args.no_reference and max(h, w) * args.scale <= 4096:
            # One tile over the whole region: what the statistic gives on this slide with no tile border at all.
            side = int(math.ceil((max(h, w) * args.scale + 2 + args.overlap) / 8.0)) * 8
            t0 = time.perf_counter()
            pred = drive(predict_source(model, info, source, dataclasses.replace(settings, tile=side), region))
            seconds = time.perf_counter() - t0
            print(f"reference (untiled, one {side} px tile): {seconds:.1f} s")
            for name, s in seam_profile(pred.labels, *borders).items():
                print(f"  {name:7s} border max {s['border_max']:5.0f}   elsewhere max {s['other_max']:5.0f}   "
                      f"median {s['median']:5.1f}   border max / median {s['ratio']:5.1f}")


if __name__ == "__main__":
    main()
