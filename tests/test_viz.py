"""labkit.viz: slider panels, timelines, benchmark tables."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import pytest

from labkit import bench, viz
from labkit.viz.bench import bench_table
from labkit.viz.panel import slider_panel
from labkit.viz.timeline import timeline_figure

# --- slider_panel -------------------------------------------------------------------------


def line(n, scale=1.0):
    fig = go.Figure(go.Scatter(x=list(range(n)), y=[scale * i * i for i in range(n)], mode="lines"))
    fig.update_layout(title=f"n={n}, scale={scale}")
    return fig


def test_panel_builds_a_figure_widget_over_its_controls():
    n, scale = widgets.IntSlider(value=3, min=1, max=10), widgets.FloatSlider(value=2.0, min=0, max=5)
    box = slider_panel(line, {"n": n, "scale": scale}, title="Squares")
    assert isinstance(box, widgets.VBox) and isinstance(box.figure, go.FigureWidget)
    assert box.controls == {"n": n, "scale": scale}
    assert box.figure in box.children and isinstance(box.children[0], widgets.HTML)
    assert "Squares" in box.children[0].value
    assert list(box.children[-1].children) == [n, scale]
    assert box.figure.data[0].y == (0.0, 2.0, 8.0)
    assert box.figure.layout.title.text == "n=3, scale=2.0"
    assert viz.slider_panel is slider_panel  # re-exported by labkit.viz


def test_moving_a_control_updates_the_same_figure_in_place():
    n, scale = widgets.IntSlider(value=3, min=1, max=10), widgets.FloatSlider(value=1.0, min=0, max=5)
    box = slider_panel(line, {"n": n, "scale": scale})
    fig = box.figure
    n.value = 5
    assert box.figure is fig
    assert fig.data[0].x == (0, 1, 2, 3, 4) and fig.data[0].y == (0.0, 1.0, 4.0, 9.0, 16.0)
    assert fig.layout.title.text == "n=5, scale=1.0"
    scale.value = 3.0
    assert fig.data[0].y == (0.0, 3.0, 12.0, 27.0, 48.0)
    assert fig.layout.title.text == "n=5, scale=3.0"


def test_panel_handles_a_changing_number_of_traces():
    def curves(k):
        fig = go.Figure([go.Scatter(y=[i, i + 1], name=f"c{i}") for i in range(k)])
        if k == 3:
            fig.add_trace(go.Bar(y=[1, 2], name="bar"))
        return fig

    k = widgets.IntSlider(value=1, min=1, max=4)
    box = slider_panel(curves, {"k": k})
    assert [t.name for t in box.figure.data] == ["c0"]
    k.value = 3
    assert [t.name for t in box.figure.data] == ["c0", "c1", "c2", "bar"]
    assert box.figure.data[3].type == "bar"
    k.value = 2
    assert [t.name for t in box.figure.data] == ["c0", "c1"]


def test_refresh_redraws_from_the_current_values():
    state = {"offset": 0}
    x = widgets.IntSlider(value=1)
    box = slider_panel(lambda x: go.Figure(go.Scatter(y=[x + state["offset"]])), {"x": x})
    state["offset"] = 10
    box.refresh()
    assert box.figure.data[0].y == (11,)


def test_redraw_drops_what_the_new_figure_no_longer_has():
    """The panel 'replaces' data and layout: an annotation, a title or a trace name the new
    figure does not set must not survive from the previous slider position."""
    def fig(warn):
        f = go.Figure(go.Scatter(y=[1, 2], name="warned" if warn else None))
        if warn:
            f.add_annotation(text="memory-bound", x=0, y=1)
            f.update_layout(title="warning")
        return f

    warn = widgets.Checkbox(value=True)
    box = slider_panel(fig, {"warn": warn})
    assert len(box.figure.layout.annotations) == 1
    warn.value = False
    assert box.figure.layout.annotations == ()
    assert box.figure.layout.title.text is None
    assert box.figure.data[0].name is None


def test_panel_rejects_bad_arguments():
    s = widgets.IntSlider(value=1)
    with pytest.raises(TypeError, match="figure_fn must be callable, got str"):
        slider_panel("line", {"n": s})
    with pytest.raises(TypeError, match="controls must be a dict"):
        slider_panel(line, [s])
    with pytest.raises(TypeError, match="controls must be a dict"):
        slider_panel(line, {"n": 3})
    with pytest.raises(TypeError, match="controls must be a dict"):
        slider_panel(line, {"n": widgets.Button()})
    with pytest.raises(TypeError, match="must return a plotly Figure, got dict"):
        slider_panel(lambda n: {"data": []}, {"n": s})


# --- timeline_figure ----------------------------------------------------------------------

SPANS = [
    {"lane": "rank 0", "start": 0, "end": 2, "label": "F0", "kind": "forward"},
    {"lane": "rank 1", "start": 2, "end": 4, "label": "F0", "kind": "forward"},
    {"lane": "rank 1", "start": 4, "end": 8, "label": "B0", "kind": "backward"},
    {"lane": "rank 0", "start": 8, "end": 12, "label": "B0", "kind": "backward"},
    {"lane": "rank 2", "start": 3, "end": 3.5},
]


def test_timeline_one_trace_per_kind_on_lanes():
    fig = timeline_figure(SPANS, title="GPipe", unit="ms")
    assert [t.name for t in fig.data] == ["forward", "backward", "work"]
    fwd, bwd, other = fig.data
    assert fwd.orientation == "h" and fwd.y == ("rank 0", "rank 1")
    assert fwd.base == (0, 2) and fwd.x == (2, 2) and fwd.text == ("F0", "F0")
    assert bwd.base == (4, 8) and bwd.x == (4, 4) and bwd.y == ("rank 1", "rank 0")
    assert other.x == (0.5,) and other.text == ("",)
    assert len({t.marker.color for t in fig.data}) == 3
    assert list(fig.layout.yaxis.categoryarray) == ["rank 2", "rank 1", "rank 0"]  # first lane on top
    assert fig.layout.title.text == "GPipe" and fig.layout.xaxis.title.text == "ms"
    assert viz.timeline_figure is timeline_figure  # re-exported by labkit.viz


def test_timeline_height_grows_with_lanes():
    one = timeline_figure([{"lane": "a", "start": 0, "end": 1}])
    three = timeline_figure(SPANS)
    assert three.layout.height > one.layout.height


def test_timeline_empty():
    assert len(timeline_figure([]).data) == 0


def test_timeline_accepts_a_generator():
    fig = timeline_figure(s for s in SPANS[:2])
    assert fig.data[0].y == ("rank 0", "rank 1")


def test_timeline_rejects_bad_spans():
    with pytest.raises(ValueError, match=r"span 1 lacks \['end'\], got keys \['lane', 'start'\]"):
        timeline_figure([SPANS[0], {"lane": "x", "start": 0}])
    with pytest.raises(ValueError, match=r"span 0 lacks \['lane'\]"):
        timeline_figure([{"start": 0, "end": 1}])
    with pytest.raises(ValueError, match=r"span 0 ends \(1\) before it starts \(2\)"):
        timeline_figure([{"lane": "x", "start": 2, "end": 1}])


# --- bench_table --------------------------------------------------------------------------


def test_bench_table_without_a_record():
    fig = bench_table(None)
    assert fig.layout.title.text == "no benchmark record yet" and len(fig.data) == 0
    assert bench_table(None, title="01-roofline: no GPU record yet").layout.title.text == "01-roofline: no GPU record yet"


def test_bench_table_of_a_record(tmp_path):
    results = [{"name": "matmul", "median_ms": 1.23456, "ratio": 2.0},
               {"name": "copy", "median_ms": 0.5, "note": None, "extra": "x"}]
    bench.record("01-alpha", results, directory=tmp_path)
    rec = bench.load("01-alpha", "cpu", directory=tmp_path)
    fig = bench_table(rec)
    (table,) = fig.data
    assert table.type == "table"
    columns = list(table.header.values)
    assert set(columns) == {"name", "median_ms", "ratio", "note", "extra"}
    cells = dict(zip(columns, table.cells.values))
    assert list(cells["name"]) == ["matmul", "copy"]
    assert list(cells["median_ms"]) == ["1.235", "0.5"]
    assert list(cells["ratio"]) == ["2", ""] and list(cells["note"]) == ["", ""]
    title = fig.layout.title.text
    assert rec["meta"]["device"] in title and rec["meta"]["torch"] in title and rec["meta"]["date"][:10] in title
    assert bench_table(rec, title="mine").layout.title.text == "mine"
    assert viz.bench_table is bench_table  # re-exported by labkit.viz
