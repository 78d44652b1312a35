"""Models that travel: bioimage.io model packages (export in ``export.py``, the way back in ``package.py``,
the exported network in ``network.py``). Nothing heavy is imported here: ``core.checkpoint`` imports
``package.py``."""
