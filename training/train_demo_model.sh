#!/usr/bin/env bash
# Reproduces src/napari_wsss_cram/assets/demo_model.pt, the bundled DEMO model: WSSS-CRAM trained with the project's own trainer on
# the project's synthetic sample data only (no patient data), with the shipped preset `sample`.
# Usage: bash training/train_demo_model.sh [extra `wsss-cram train` flags, e.g. --device cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=${RUN:-runs/demo}
# the joint model alone (--stage 1): the demo shows its activation maps, which segmentation rounds do not have
$BIN/wsss-cram train sample_data/patches --val sample_data/validation --config sample --stage 1 --out "$RUN" "$@"
# Ship the best checkpoint (or the last) with half-precision weights: half the size, same predictions to ~1e-3
# (load_checkpoint casts them back to float32).
$BIN/python - "$RUN" src/napari_wsss_cram/assets/demo_model.pt <<'PY'
import sys
from pathlib import Path

from napari_wsss_cram.core.checkpoint import load_checkpoint, save_checkpoint

run, out = Path(sys.argv[1]), Path(sys.argv[2])
best = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
model, info = load_checkpoint(best)
extra = dict(info.extra, demo_model="trained on synthetic sample data only (training/train_demo_model.sh)")
save_checkpoint(out, model.half(), extra=extra, train_config=info.train_config)
print(f"{best} -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
PY
