"""Files shipped inside the package: training presets and the demo model.

They live in the package (``presets/*.toml``, ``assets/demo_model.pt``) so that a wheel install works alone,
without the source tree, offline. Everyone finds them through this module.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: The training presets, found by name (``--config cpu-small``).
PRESETS_DIR = PACKAGE_DIR / "presets"
#: Overrides the bundled demo model (e.g. a retrained demo model kept elsewhere).
DEMO_MODEL_ENV = "WSSS_CRAM_DEMO_MODEL"
DEMO_MODEL = PACKAGE_DIR / "assets" / "demo_model.pt"


def preset_names() -> list[str]:
    """The names of the shipped presets (``wsss4luad``, ``cpu-small``, ``sample``), sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_path(name: str | os.PathLike) -> Path:
    """A preset name -> its shipped file (``"cpu-small"`` -> ``presets/cpu-small.toml``); a path is kept as is."""
    p = Path(name)
    if p.suffix == ".toml" or p.exists() or len(p.parts) > 1:
        return p
    return PRESETS_DIR / f"{p.name}.toml"


def demo_model_path() -> Path:
    """The bundled demo model (trained on the synthetic sample data only), or ``$WSSS_CRAM_DEMO_MODEL``."""
    env = os.environ.get(DEMO_MODEL_ENV)
    return Path(env) if env else DEMO_MODEL
