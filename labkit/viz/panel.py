"""Slider-driven figure panels: the "Play" section of every chapter.

`slider_panel(figure_fn, controls)` shows a plotly FigureWidget above its controls and
redraws it in place whenever a control moves; `figure_fn(**values)` builds the figure from
the controls' current values (keep it under ~200 ms on a CPU).
"""

from __future__ import annotations

from typing import Callable

import ipywidgets as widgets
import plotly.graph_objects as go


def _apply(target: go.FigureWidget, source: go.Figure) -> None:
    """Replace target's traces and layout with source's, keeping the widget (one redraw)."""
    with target.batch_update():
        target.data = ()
        target.add_traces(source.data)
        target.layout = source.layout


def slider_panel(figure_fn: Callable[..., go.Figure], controls: dict[str, widgets.Widget], *,
                 title: str | None = None) -> widgets.VBox:
    """A figure over its controls; moving any control redraws the figure.

    The returned VBox carries `.figure` (the FigureWidget), `.controls` and `.refresh()`.
    """
    if not callable(figure_fn):
        raise TypeError(f"slider_panel: figure_fn must be callable, got {type(figure_fn).__name__}")
    if not isinstance(controls, dict) or not all(isinstance(w, widgets.ValueWidget) for w in controls.values()):
        raise TypeError("slider_panel: controls must be a dict of name -> ipywidgets value widget")

    def values() -> dict:
        return {name: w.value for name, w in controls.items()}

    first = figure_fn(**values())
    if not isinstance(first, go.Figure):
        raise TypeError(f"slider_panel: figure_fn must return a plotly Figure, got {type(first).__name__}")
    fig = go.FigureWidget(first)

    def refresh(_change=None) -> None:
        _apply(fig, figure_fn(**values()))

    for w in controls.values():
        w.observe(refresh, names="value")
    row = widgets.Box(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap", gap="4px 16px"))
    children = ([widgets.HTML(f"<b>{title}</b>")] if title else []) + [fig, row]
    box = widgets.VBox(children)
    box.figure, box.controls, box.refresh = fig, controls, refresh
    return box
