"""Plotting and widgets for the chapters (the only place labkit draws anything).

Shared building blocks: `slider_panel` (the Play sections), `timeline_figure` (Gantt charts),
`bench_table` (recorded benchmarks), `loss_curves_figure` (training runs side by side).
Chapter figures live in one module per chapter family and are importable from there.
"""

from labkit.viz.bench import bench_table
from labkit.viz.optim import bench_bars_figure, loss_curves_figure, lr_schedule_figure, update_histogram_figure
from labkit.viz.panel import slider_panel
from labkit.viz.timeline import timeline_figure

__all__ = [
    "bench_bars_figure", "bench_table", "loss_curves_figure", "lr_schedule_figure", "slider_panel",
    "timeline_figure", "update_histogram_figure",
]
