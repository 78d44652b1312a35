"""napari docks of napari-wsss-cram (Segment, Train) and how results become layers; all logic is in ``core``."""
