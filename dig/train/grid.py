"""Moved to dig.inference.grid (sampling is a room of its own beside training); kept for old imports."""
from dig.inference.grid import grid_labels, grid_shape, sample_grid, tile  # noqa: F401
