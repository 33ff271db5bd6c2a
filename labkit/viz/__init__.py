"""Plotting and widgets for the chapters (the only place labkit draws anything)."""

from labkit.viz.bench import bench_table
from labkit.viz.compile import op_histogram_figure, recompile_figure, timing_figure
from labkit.viz.panel import slider_panel
from labkit.viz.roofline import intensity_vs_batch_figure, layer_roofline_figure, roofline_figure, sweep_figure
from labkit.viz.timeline import timeline_figure

__all__ = [
    "bench_table", "intensity_vs_batch_figure", "layer_roofline_figure", "op_histogram_figure",
    "recompile_figure", "roofline_figure", "slider_panel", "sweep_figure", "timeline_figure", "timing_figure",
]
