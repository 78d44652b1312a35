"""The bioimage.io model package of a checkpoint (default: the demo model): export time, package size and its
files, then bioimage.io's own test (``bioimageio test``) with its time and one line per check.

    .venv/bin/python benchmarks/model_package.py [CHECKPOINT] [--out DIR] [--no-test]
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="a .pt checkpoint (default: the demo model)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the package (default: a temporary one)")
    parser.add_argument("--no-test", action="store_true", help="skip bioimageio's test")
    args = parser.parse_args()

    from napari_wsss_cram.core.progress import drive
    from napari_wsss_cram.core.resources import demo_model_path
    from napari_wsss_cram.core.zoo.export import check_package, export_model

    checkpoint = args.checkpoint or demo_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)) / "model_bioimageio.zip"
        result = drive(export_model(checkpoint, out, ["Benchmark"], "CC-BY-4.0", overwrite=True))
        print(f"checkpoint {checkpoint}: {Path(checkpoint).stat().st_size / 1e6:.1f} MB")
        print(f"export: {result.seconds:.1f} s, package {result.size_bytes / 1e6:.1f} MB")
        with zipfile.ZipFile(out) as archive:
            for item in archive.infolist():
                print(f"  {item.filename:<24} {item.file_size / 1e6:8.2f} MB ({item.compress_size / 1e6:.2f} zipped)")
        if not args.no_test:
            check = check_package(out)
            print(check.summary())
            print(f"bioimageio test: {check.status} in {check.seconds:.1f} s")


if __name__ == "__main__":
    main()
