"""Static, self-contained HTML reports of a run (`run_index`) and of a sweep (`sweep_report`).

A report opens from disk with no network: every picture, video and plot is embedded as a
base64 ``data:`` URI, the style is one inline ``<style>`` and the sweep table's sorting one small
inline ``<script>``; nothing links outside the document except the sweep's links to each lift's
own report. Every string from the run (config values, metric names, paths) is HTML-escaped.

A run directory's pieces are all optional: a missing or unreadable one (no ``final/`` yet, an
empty ``metrics.jsonl``) is left out with a short note, never an exception. Preview strips and
sweep thumbnails are downscaled (`PREVIEW_HEIGHT`, `THUMB_HEIGHT`) to keep reports small;
``final/view.png`` and the videos are embedded as they are. Plots use matplotlib's Agg canvas
(no pyplot, no global state). Writers are atomic (`sjc_jax.files.atomic_path`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sjc_jax import export, files, rundir

INDEX = "index.html"
# Stored height (pixels) of the preview strip's images and of the sweep's thumbnails.
PREVIEW_HEIGHT = 256
THUMB_HEIGHT = 128
# Curves the sweep overlays when present (else the first varying metrics), and how many.
SWEEP_CURVES = ("opacity", "score_norm")
NUM_SWEEP_CURVES = 2
_PREVIEW_RE = re.compile(r"^step_(\d+)\.png$")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
summary { cursor: pointer; } summary h2 { display: inline; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: middle; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.sortable { cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
th.setting { background: #e8eef8; } th.eval { background: #e8f5e8; }
th.metric { background: #f8f0e4; }
.note { color: #777; font-style: italic; }
.strip { display: flex; gap: 0.5em; overflow-x: auto; padding-bottom: 0.5em; }
.strip figure { margin: 0; flex: none; text-align: center; font-size: 0.8em; }
.strip img { height: 160px; display: block; }
video, img.view, img.plot { max-width: 100%; }
.videos { display: flex; flex-wrap: wrap; gap: 1em; }
.videos figure { margin: 0; }
video.result { width: 512px; max-width: 100%; image-rendering: pixelated; }
#mesh-view { width: 512px; max-width: 100%; border: 1px solid #ddd; cursor: grab;
  touch-action: none; }
img.thumb { height: 64px; display: block; }
"""

# Click a header to sort the lifts by it (again to reverse); empty cells stay last.
_SORT_SCRIPT = """
(function () {
  var table = document.getElementById("lifts");
  if (!table || !table.tHead || !table.tBodies.length) { return; }
  var body = table.tBodies[0];
  var heads = table.tHead.rows[0].cells;
  function value(row, i, numeric) {
    var cell = row.cells[i];
    if (!cell) { return null; }
    var raw = cell.getAttribute("data-v");
    var text = raw !== null ? raw : (cell.textContent || "").trim();
    if (text === "") { return null; }
    if (!numeric) { return text; }
    var num = Number(text);
    return isNaN(num) ? null : num;
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    if (!th.classList.contains("sortable")) { return; }
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      var numeric = th.getAttribute("data-type") === "num";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var keyed = Array.prototype.map.call(body.rows, function (row, j) {
        return { row: row, j: j, v: value(row, i, numeric) };
      });
      keyed.sort(function (a, b) {
        if (a.v === null || b.v === null) {
          return (a.v === null) - (b.v === null) || a.j - b.j;
        }
        var c = numeric ? a.v - b.v : String(a.v).localeCompare(String(b.v), undefined,
                                                                 { numeric: true });
        return c !== 0 ? (asc ? c : -c) : a.j - b.j;
      });
      keyed.forEach(function (k) { body.appendChild(k.row); });
    });
  });
})();
"""


# --- small helpers ------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _exact(value: Any) -> str:
    """A config or setting value as written: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _short(value: Any) -> str:
    """A measured value: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return _exact(value)


def _cell(value: Any, *, short: bool, null: bool = False) -> str:
    """A ``<td>``; numbers carry their exact value in ``data-v`` (for sorting) and align right.

    None is an empty cell (a missing value), or ``null`` if ``null`` (a config's value).
    """
    if value is None and not null:
        return "<td></td>"
    text = _short(value) if short else _exact(value)
    if _is_number(value):
        exact = repr(value) if not math.isinf(value) else ("Infinity" if value > 0 else "-Infinity")
        return f'<td class="num" data-v="{_esc(exact)}">{_esc(text)}</td>'
    return f"<td>{_esc(text)}</td>"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _png(path: Path, *, height: int | None = None) -> bytes | None:
    """The PNG at ``path``, downscaled to ``height`` pixels if taller (as is if that fails)."""
    data = _read_bytes(path)
    if data is None or height is None:
        return data
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            if image.height <= height:
                return data
            width = max(1, round(image.width * height / image.height))
            small = image.convert("RGBA" if "A" in image.getbands() else "RGB").resize(
                (width, height), Image.Resampling.LANCZOS
            )
        buffer = io.BytesIO()
        small.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()
    except Exception:  # any picture Pillow cannot read is embedded as it is
        return data


def _img(data: bytes, *, alt: str, cls: str = "") -> str:
    klass = f' class="{_esc(cls)}"' if cls else ""
    return f'<img{klass} src="{_data_uri(data, "image/png")}" alt="{_esc(alt)}">'


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{section: {field: value}}`` -> ``[("section.field", value), ...]`` (any depth)."""
    out: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _flatten(value, f"{name}.")
        else:
            out.append((name, value))
    return out


def _scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries (numbers, strings, booleans) of a dict; lists and dicts dropped."""
    return {
        str(k): v for k, v in values.items() if isinstance(v, (int, float, str, bool)) or v is None
    }


def _curve_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric metrics (not step, label, finite) that take more than one value, in first order."""
    keys = dict.fromkeys(
        k for r in records for k, v in r.items() if k not in export.NOT_CURVES and _is_number(v)
    )
    varying = []
    for key in keys:
        seen = {float(r[key]) for r in records if _is_number(r.get(key))}
        if len({v for v in seen if not math.isnan(v)}) > 1:
            varying.append(key)
    return varying


def _series(records: Sequence[Mapping[str, Any]], key: str):
    """``(steps, values)`` float arrays of one metric (NaN where a record lacks it)."""
    steps = np.array([float(r.get("step", i)) for i, r in enumerate(records)])
    values = np.array([float(r[key]) if _is_number(r.get(key)) else np.nan for r in records])
    return steps, values


def _plain(text: str) -> str:
    """``text`` for a matplotlib label: a ``$`` is a dollar sign, never mathtext."""
    return str(text).replace("$", r"\$")


def _page(title: str, body: Iterable[str], *, script: str = "") -> str:
    script_tag = f"<script>{script}</script>\n" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n" + "\n".join(body) + f"\n{script_tag}</body>\n</html>\n"
    )


def _write(path: Path, text: str) -> Path:
    with files.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# --- one run ------------------------------------------------------------------------------------


def _previews(run_dir: Path) -> list[tuple[int | None, Path]]:
    """``(step, path)`` of every ``previews/*.png``: by step, then unnumbered ones by name."""
    try:
        paths = [p for p in (run_dir / rundir.PREVIEWS).glob("*.png") if p.is_file()]
    except OSError:
        return []
    found = []
    for path in paths:
        match = _PREVIEW_RE.match(path.name)
        found.append((int(match.group(1)) if match else None, path))
    return sorted(found, key=lambda sp: (sp[0] is None, sp[0] or 0, sp[1].name))


def _config_section(run_dir: Path) -> str:
    config = _read_json(run_dir / rundir.CONFIG)
    if not isinstance(config, Mapping):
        return "<h2>Config</h2>\n" + _note(f"No readable {rundir.CONFIG}.")
    rows = "".join(
        f"<tr><td>{_esc(name)}</td>{_cell(value, short=False, null=True)}</tr>\n"
        for name, value in _flatten(config)
    )
    return (
        f"<details><summary><h2>Config</h2></summary>\n"
        f'<table id="config">\n<thead><tr><th>field</th><th>value</th></tr></thead>\n'
        f"<tbody>\n{rows}</tbody></table>\n</details>"
    )


def _eval_section(final: Path) -> str:
    evaluation = _read_json(final / "eval.json")
    if not isinstance(evaluation, Mapping):
        return ""
    scalars = _scalars(evaluation)
    rows = "".join(
        f"<tr><td>{_esc(name)}</td>{_cell(value, short=True)}</tr>\n"
        for name, value in scalars.items()
    )
    left = len([k for k in evaluation if k not in scalars and k != "mesh"])
    more = _note(f"{left} per-camera lists of eval.json not shown.") if left else ""
    return (
        f'<h2>Evaluation</h2>\n<table id="eval">\n<thead><tr><th>metric</th><th>value</th></tr>'
        f"</thead>\n<tbody>\n{rows}</tbody></table>\n{more}"
    )


def _mesh_info_section(final: Path) -> str:
    """The mesh's level, pieces and (testbed, learned) its distances to the true surface."""
    evaluation = _read_json(final / "eval.json")
    info = evaluation.get("mesh") if isinstance(evaluation, Mapping) else None
    if not isinstance(info, Mapping):
        info = _read_json(final / rundir.MESH_INFO)
    if not isinstance(info, Mapping):
        return ""
    rows = "".join(
        f"<tr><td>{_esc(name)}</td>{_cell(value, short=True, null=True)}</tr>\n"
        for name, value in _scalars(info).items()
    )
    return (
        f'<h2>Mesh</h2>\n<table id="mesh">\n<thead><tr><th>mesh</th><th>value</th></tr>'
        f"</thead>\n<tbody>\n{rows}</tbody></table>\n"
        + _note("Level rule, pieces and distances: docs/outputs.md of sjc-jax.")
    )


def _mesh_view_section(final: Path) -> str:
    """The interactive view of ``final/mesh.ply`` (`sjc_jax.mesh_viewer`)."""
    from sjc_jax import mesh_viewer

    path = final / "mesh.ply"
    if not path.is_file():
        return ""
    try:
        import trimesh

        mesh = trimesh.load(path, process=False, force="mesh")
        faces = np.asarray(mesh.faces)
        colors = np.asarray(mesh.visual.vertex_colors)
    except Exception:  # an unreadable mesh file is left out with a note, as other pieces
        return "<h2>Mesh</h2>\n" + _note("final/mesh.ply could not be read.")
    if len(faces) == 0:
        return _note("The mesh is empty: no surface to show.")
    if len(faces) > mesh_viewer.MAX_FACES:
        return _note(
            f"The mesh has {len(faces)} faces, more than the page embeds "
            f"({mesh_viewer.MAX_FACES}); open final/mesh.glb in a viewer."
        )
    return (
        "<figure>"
        + mesh_viewer.viewer_html(mesh.vertices, faces, colors)
        + "<figcaption>mesh: drag to rotate, wheel to zoom, double click to reset"
        "</figcaption></figure>"
    )


def _result_section(final: Path) -> str:
    """The turntable, its depth and the interactive mesh, side by side."""
    figures = []
    for name, caption in (("turntable.mp4", "turntable"), ("depth.mp4", "depth")):
        data = _read_bytes(final / name)
        if data is None:
            continue
        figures.append(
            f'<figure><video class="result" controls loop muted autoplay playsinline>'
            f'<source src="{_data_uri(data, "video/mp4")}" type="video/mp4"></video>'
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )
    figures.append(_mesh_view_section(final))
    figures = [f for f in figures if f]
    if not figures:
        return ""
    return '<h2>Result</h2>\n<div class="videos">' + "".join(figures) + "</div>"


def _final_sections(run_dir: Path) -> list[str]:
    final = run_dir / rundir.FINAL
    if not final.is_dir():
        return [_note("No final/ yet: the run has not finished (or stopped before writing it).")]
    return [part for part in (_result_section(final), _eval_section(final)) if part]


def _final_view_section(run_dir: Path) -> str:
    view = _png(run_dir / rundir.FINAL / "view.png")
    if view is None:
        return ""
    return "<h2>Final view</h2>\n" + _img(view, alt="final view (image | depth)", cls="view")


def _previews_section(run_dir: Path) -> str:
    figures = []
    for step, path in _previews(run_dir):
        data = _png(path, height=PREVIEW_HEIGHT)
        if data is None:
            continue
        caption = f"step {step}" if step is not None else path.name
        image = _img(data, alt=caption)
        figures.append(f"<figure>{image}<figcaption>{_esc(caption)}</figcaption></figure>")
    if not figures:
        return "<h2>Previews</h2>\n" + _note("No previews.")
    return '<h2>Previews</h2>\n<div class="strip">' + "".join(figures) + "</div>"


def _metrics_section(run_dir: Path) -> str:
    records = rundir.read_metrics(run_dir / rundir.METRICS)
    if not records:
        return "<h2>Metrics</h2>\n" + _note("No metrics recorded.")
    summary = _note(f"{len(records)} steps recorded, the last is step {records[-1]['step']}.")
    keys = _curve_keys(records)
    if not keys:
        return "<h2>Metrics</h2>\n" + summary + _note("No metric varies over the steps.")
    plot = _img(
        export.metrics_png(records, keys=keys), alt="metric curves: " + ", ".join(keys), cls="plot"
    )
    return "<h2>Metrics</h2>\n" + summary + plot


def run_index(run_dir: str | os.PathLike, *, title: str | None = None) -> str:
    """The self-contained HTML report of one run directory.

    The result first (turntable and depth videos, the interactive mesh), then the evaluation
    (``final/eval.json``), the metric curves, the mesh's level and pieces (and its distances to
    the true surface), the final view, the preview strip, and the config folded away; missing
    pieces are left out with a note.

    Args:
      run_dir: the run's ``--out`` directory.
      title: page title; default ``Run <directory name>``.

    Returns:
      The HTML document.
    """
    run_dir = Path(run_dir)
    if title is None:
        title = f"Run {run_dir.resolve().name or run_dir}"
    body = [
        *_final_sections(run_dir),
        _metrics_section(run_dir),
        _mesh_info_section(run_dir / rundir.FINAL),
        _final_view_section(run_dir),
        _previews_section(run_dir),
        _config_section(run_dir),
    ]
    return _page(title, [part for part in body if part])


def write_run_index(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write `run_index` of ``run_dir`` to ``path`` (default ``run_dir/final/index.html``).

    Raises:
      ValueError: ``path`` is not given and ``run_dir`` has no ``final/``.
    """
    run_dir = Path(run_dir)
    if path is None:
        final = run_dir / rundir.FINAL
        if not final.is_dir():
            raise ValueError(f"{run_dir} has no {rundir.FINAL}/ (the run has not finished)")
        path = final / INDEX
    return _write(Path(path), run_index(run_dir))


# --- a sweep ------------------------------------------------------------------------------------


def _union(mappings: Iterable[Mapping[str, Any] | None]) -> list[str]:
    return list(dict.fromkeys(str(k) for m in mappings if isinstance(m, Mapping) for k in m))


def _numeric_column(values: Iterable[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(_is_number(v) for v in present)


def _link(lift_dir: Path, base: str | os.PathLike | None) -> str:
    index = lift_dir / rundir.FINAL / INDEX
    if base is None:
        return index.resolve().as_uri()
    return urllib.parse.quote(Path(os.path.relpath(index, base)).as_posix())


def _sweep_table(rows: Sequence[Mapping[str, Any]], base: str | os.PathLike | None) -> str:
    groups = {
        "setting": _union(r.get("settings") for r in rows),
        # scalars only: per-camera lists belong on the lift's own page
        "eval": _union(
            _scalars(r["eval"]) if isinstance(r.get("eval"), Mapping) else None for r in rows
        ),  # fmt: skip
        "metric": _union(r.get("metrics") for r in rows),
    }
    field = {"setting": "settings", "eval": "eval", "metric": "metrics"}

    def get(row: Mapping[str, Any], group: str, key: str) -> Any:
        values = row.get(field[group])
        return values.get(key) if isinstance(values, Mapping) else None

    heads = ['<th class="sortable" title="sort by lift name">lift</th>', "<th>view</th>"]
    for group, keys in groups.items():
        for key in keys:
            kind = ' data-type="num"' if _numeric_column(get(r, group, key) for r in rows) else ""
            heads.append(
                f'<th class="sortable {group}"{kind} title="{_esc(f"{group}: {key}")}">'
                f"{_esc(key)}</th>"
            )
    body = []
    for row in rows:
        name = str(row.get("lift", ""))
        lift_dir = Path(row.get("dir", "."))
        href = _esc(_link(lift_dir, base))
        thumb = _png(lift_dir / rundir.FINAL / "view.png", height=THUMB_HEIGHT)
        view = (
            f'<a href="{href}">{_img(thumb, alt=f"view of {name}", cls="thumb")}</a>'
            if thumb is not None
            else '<span class="note">no view</span>'
        )
        cells = [f'<td><a href="{href}">{_esc(name)}</a></td>', f"<td>{view}</td>"]
        for group, keys in groups.items():
            short = group != "setting"
            cells += [_cell(get(row, group, key), short=short) for key in keys]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<table id="lifts">\n<thead><tr>' + "".join(heads) + "</tr></thead>\n<tbody>\n"
        + "\n".join(body) + "\n</tbody></table>\n"
        + _note("Click a column's header to sort by it (again to reverse).")
    )  # fmt: skip


def _sweep_curves(
    rows: Sequence[Mapping[str, Any]], curves: Sequence[str] | None
) -> tuple[str, str] | None:
    """``(alt text, data URI)`` of the overlaid curves of every lift, or None if none."""
    lifts = []
    for row in rows:
        records = rundir.read_metrics(Path(row.get("dir", ".")) / rundir.METRICS)
        if records:
            lifts.append((str(row.get("lift", "")), records))
    if not lifts:
        return None
    varying = list(dict.fromkeys(k for _, records in lifts for k in _curve_keys(records)))
    if curves is None:
        keys = [k for k in SWEEP_CURVES if k in varying]
        keys += [k for k in varying if k not in keys][: max(0, NUM_SWEEP_CURVES - len(keys))]
    else:
        keys = [k for k in curves if k in varying]
    if not keys:
        return None
    figure, nrows, ncols = export.metric_figure(len(keys), width=5.0, height=3.2, cols=2)
    handles = []
    for i, key in enumerate(keys):
        axes = figure.add_subplot(nrows, ncols, i + 1)
        axes.set_prop_cycle(color=[_colour(j, len(lifts)) for j in range(len(lifts))])
        for name, records in lifts:
            steps, values = _series(records, key)
            window = max(1, len(records) // 50)
            if window > 1:
                steps, values = steps[window - 1 :], export.running_mean(values, window)
            (line,) = axes.plot(steps, values, lw=1.2, label=_plain(name))
            if i == 0:
                handles.append(line)
        export.style_metric_axes(axes, key)
    figure.legend(handles=handles, loc="outside right upper", fontsize=8, title="lift")
    alt = f"{', '.join(keys)} of each lift (running mean over ~2 % of each run)"
    return alt, _data_uri(export.figure_png(figure), "image/png")


def _colour(i: int, n: int) -> Any:
    from matplotlib import colormaps

    if n <= 10:
        return colormaps["tab10"](i)
    return colormaps["viridis"](i / max(1, n - 1))


def sweep_report(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "Sweep",
    base: str | os.PathLike | None = None,
    curves: Sequence[str] | None = None,
) -> str:
    """The self-contained HTML report of a sweep: a sortable table of lifts and their curves.

    Args:
      rows: one dict per lift: ``lift`` (name), ``dir`` (its run directory), ``settings``
        (what differs between lifts), ``metrics`` (last values), ``eval`` (dict or None).
      title: page title.
      base: directory the report lives in: links to each lift's ``final/index.html`` are
        relative to it (absolute ``file://`` URIs if None).
      curves: metrics to overlay; default `SWEEP_CURVES` where present, else the first
        `NUM_SWEEP_CURVES` varying ones.

    Returns:
      The HTML document.
    """
    rows = list(rows)
    body = [f"<p>{len(rows)} lifts.</p>"]
    if rows:
        body.append(_sweep_table(rows, base))
    else:
        body.append(_note("No lifts."))
    plot = _sweep_curves(rows, curves) if rows else None
    body.append("<h2>Curves</h2>")
    if plot is None:
        body.append(_note("No metric curves to overlay."))
    else:
        alt, uri = plot
        body.append(f'<img class="plot" src="{uri}" alt="{_esc(alt)}">')
    return _page(title, body, script=_SORT_SCRIPT if rows else "")


def write_sweep_report(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "Sweep",
    curves: Sequence[str] | None = None,
) -> Path:
    """Write `sweep_report` to ``path`` (links relative to its directory), atomically."""
    path = Path(path)
    return _write(path, sweep_report(rows, title=title, base=path.parent, curves=curves))


__all__ = [
    "INDEX",
    "NUM_SWEEP_CURVES",
    "PREVIEW_HEIGHT",
    "SWEEP_CURVES",
    "THUMB_HEIGHT",
    "run_index",
    "sweep_report",
    "write_run_index",
    "write_sweep_report",
]
