"""napari-wsss-cram: weakly-supervised tissue maps of H&E slides (WSSS-CRAM)."""

__version__ = "0.1.0"
