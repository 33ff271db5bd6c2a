"""Plotting and widgets for the chapters (the only place labkit draws anything)."""

from labkit.viz.bench import bench_table
from labkit.viz.panel import slider_panel
from labkit.viz.timeline import timeline_figure

__all__ = ["bench_table", "slider_panel", "timeline_figure"]
