"""A longer run of the input fuzzer (``tests/test_fuzz_inputs.py``): more examples per target, fresh random
draws each run, and a count of what each target did with them (read / refused). Any other outcome (a crash,
another exception, a hang past the 20 s deadline) stops the run with hypothesis's minimal failing example.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fuzz_inputs.py --examples 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="examples per target (CI runs 25)")
    parser.add_argument("--seeded", action="store_true", help="the CI's fixed draws instead of fresh ones")
    args = parser.parse_args(argv)
    os.environ["WSSS_FUZZ_EXAMPLES"] = str(args.examples)
    if not args.seeded:
        os.environ["WSSS_FUZZ_RANDOM"] = "1"
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import test_fuzz_inputs as fuzz

    t0 = time.perf_counter()
    runs = [(f"image {s}", lambda s=s: fuzz.test_image_reader_never_crashes_on_damaged_files(s))
            for s in sorted(fuzz.SEEDS)]
    runs += [("patch names", fuzz.test_patch_name_parser_gives_flags_or_a_clear_error),
             ("labels CSV", fuzz.test_labels_csv_gives_an_index_or_a_clear_error),
             ("GeoJSON", fuzz.test_geojson_importer_gives_labels_or_a_clear_error),
             ("GeoJSON file", fuzz.test_geojson_file_bytes_give_labels_or_a_clear_error)]
    checkpoint = fuzz.checkpoint_bytes()
    runs.append(("checkpoint", lambda: fuzz.test_checkpoint_loading_never_crashes_on_damaged_files(checkpoint)))
    runs.append(("CLI flags", lambda: fuzz.test_predict_flags_give_settings_that_segment_or_a_clear_error(checkpoint)))
    runs.append(("TOML preset", fuzz.test_training_presets_give_a_config_or_a_clear_error))
    print("| target | examples | outcomes | seconds |\n|---|---|---|---|")
    for name, run in runs:
        t = time.perf_counter()
        run()
        seen = fuzz.OUTCOMES.get(name, {})
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))
        print(f"| {name} | {sum(seen.values())} | {outcomes} | {time.perf_counter() - t:.0f} |", flush=True)
    print(f"\nall targets: no crash, no other exception, no hang ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
