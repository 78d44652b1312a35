"""Regenerate the project's synthetic sample data (thin wrapper around `wsss-cram make-sample-data`).

    python training/make_sample_data.py --out sample_data --montage docs/sample_montage.png
"""

from __future__ import annotations

import sys

from napari_wsss_cram.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-sample-data", *sys.argv[1:]]))
