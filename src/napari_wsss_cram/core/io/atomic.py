"""The one atomic-write helper: write under a hidden temporary name next to the final file, rename on success.

Every file the package writes (outputs, checkpoints, resume states, demo images) goes through it, so a failure,
a full disk or a cancel never leaves a half-written file under the final name. The temporaries are named
``.<stem>.<tag>.partial<suffixes>`` (hidden; same suffixes, since writers pick the format from them), which
``recover_interrupted_outputs`` recognises.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_path(final_path: str | os.PathLike, tag: str | None = None) -> Path:
    """A hidden temporary path next to ``final_path`` with the same suffix(es) (``.ome.tif`` kept whole)."""
    final = Path(final_path)
    suffixes = "".join(final.suffixes[-2:]) if final.name.lower().endswith((".ome.tif", ".ome.tiff")) \
        else final.suffix
    stem = final.name[: len(final.name) - len(suffixes)] if suffixes else final.name
    return final.with_name(f".{stem}.{tag or uuid.uuid4().hex[:8]}.partial{suffixes}")


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path`` (same suffixes); rename it into place on success.

    On any exception (including a cancel) the temporary file is removed and the final path is untouched.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
