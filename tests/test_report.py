"""Tests of sjc_jax.report: self-contained HTML reports of a run and of a sweep."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from sjc_jax import report
from sjc_jax.export import save_png, save_video

_VOID = {"area", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
_MAGIC = {"image/png": (0, b"\x89PNG\r\n\x1a\n"), "video/mp4": (4, b"ftyp")}


class _Collector(HTMLParser):
    """Tags, attributes, table cells and nesting errors of a document."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.decl: list[str] = []
        self.tables: dict[str, dict] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._section = ""
        self.texts: dict[str, list[str]] = {}  # tag -> its texts (h1, title, figcaption, p)
        self._text_tag: str | None = None

    def handle_decl(self, decl):
        self.decl.append(decl)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag not in _VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = attrs.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = {"head": [], "body": [], "head_attrs": []}
        elif tag in ("thead", "tbody"):
            self._section = tag
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
            if tag == "th" and self._table is not None:
                self.tables[self._table]["head_attrs"].append(attrs)
        elif tag in ("h1", "h2", "title", "figcaption", "p"):
            self._text_tag = tag
            self.texts.setdefault(tag, []).append("")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in _VOID:
            self.errors.append(f"end tag of void element <{tag}>")
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            key = "head" if self._section == "thead" else "body"
            self.tables[self._table][key].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        if tag == self._text_tag:
            self._text_tag = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._text_tag is not None:
            self.texts[self._text_tag][-1] += data


def _parse(text: str) -> _Collector:
    collector = _Collector()
    collector.feed(text)
    collector.close()
    return collector


def _check_document(text: str) -> _Collector:
    """Well formed, self-contained, every embedded media a data URI of the right type."""
    assert text.startswith("<!DOCTYPE html>")
    doc = _parse(text)
    assert doc.errors == [] and doc.stack == []
    assert ("meta", {"charset": "utf-8"}) in doc.tags
    for tag, attrs in doc.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not value.lower().startswith(("http://", "https://", "//")), (tag, value)
        assert tag not in ("link", "iframe", "object", "embed"), tag
        if tag == "script":
            assert "src" not in attrs
        if tag in ("img", "video", "source") and "src" in attrs:
            _check_data_uri(attrs["src"], "video/mp4" if tag != "img" else "image/png")
    assert "http://" not in text and "https://" not in text
    return doc


def _check_data_uri(uri: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix), uri[:40]
    data = base64.b64decode(uri[len(prefix) :], validate=True)
    offset, magic = _MAGIC[mime]
    assert data[offset : offset + len(magic)] == magic
    return data


def _media(doc: _Collector, tag: str) -> list[dict]:
    return [attrs for t, attrs in doc.tags if t == tag]


def _records(steps: int = 10, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "step": s,
            "sigma": float(rng.uniform(0.1, 5.0)),
            "label": int(rng.integers(4)),
            "opacity": 0.1 + 0.05 * s,
            "score_norm": float(1.0 / (1 + s)),
            "emptiness": float(rng.uniform()),
            "finite": True,
            "num_samples": 64,
        }
        for s in range(steps)
    ]


CONFIG = {
    "model": {"kind": "testbed", "name": "<b>bold & co</b>"},
    "run": {"steps": 10, "seed": 3, "mesh_threshold": None},
    "optimizer": {"lr": 0.05},
    "render": {"aabb": [[-1, -1, -1], [1, 1, 1]]},
}
EVAL = {"psnr": 18.4, "iou": 0.61, "janus": 0.3, "psnr_per_camera": [18.0, 18.8], "extra": {}}


def _make_run(
    directory: Path,
    *,
    final: bool = True,
    evaluation: dict | None = EVAL,
    records: list[dict] | None = None,
    seed: int = 0,
) -> Path:
    """A tiny run directory with real PNG/MP4 files."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    records = _records(seed=seed) if records is None else records
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in (8, 0, 4):  # written out of order: the strip sorts them
        image = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
        save_png(directory / "previews" / f"step_{step:08d}.png", image)
    if final:
        save_png(directory / "final" / "view.png", rng.integers(0, 256, (8, 16, 3), np.uint8))
        frames = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
        save_video(directory / "final" / "turntable.mp4", frames)
        save_video(directory / "final" / "depth.mp4", frames[::-1])
        if evaluation is not None:
            (directory / "final" / "eval.json").write_text(json.dumps(evaluation))
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("runs") / "run")


def test_run_index_is_self_contained_and_complete(run_dir):
    text = report.run_index(run_dir)
    doc = _check_document(text)
    assert doc.texts["h1"] == ["Run run"]

    sources = [a["src"] for a in _media(doc, "source")]
    assert len(sources) == 2  # turntable and depth
    for attrs in _media(doc, "video"):
        assert {"controls", "loop", "muted", "autoplay"} <= set(attrs)
    for source in sources:
        _check_data_uri(source, "video/mp4")
    images = _media(doc, "img")
    assert all(_check_data_uri(a["src"], "image/png") for a in images)
    # view + 3 previews + the metrics plot
    assert len(images) == 5

    # The preview strip is in step order, with step captions.
    assert doc.texts["figcaption"] == ["turntable", "depth", "step 0", "step 4", "step 8"]

    config = dict(map(tuple, doc.tables["config"]["body"]))
    assert config["model.kind"] == "testbed"
    assert config["model.name"] == "<b>bold & co</b>"  # escaped: no <b> tag in the document
    assert "b" not in {t for t, _ in doc.tags}
    assert config["run.seed"] == "3"
    assert config["run.mesh_threshold"] == "null"
    assert config["optimizer.lr"] == "0.05"
    assert config["render.aabb"] == json.dumps(CONFIG["render"]["aabb"])

    evaluation = dict(map(tuple, doc.tables["eval"]["body"]))
    assert evaluation == {"psnr": "18.4", "iou": "0.61", "janus": "0.3"}  # scalars only

    (plot,) = [a for a in images if a["alt"].startswith("metric curves")]
    plotted = plot["alt"].removeprefix("metric curves: ").split(", ")
    assert plotted == ["sigma", "opacity", "score_norm", "emptiness"]  # varying, not label/finite


def test_run_index_without_final_or_metrics(tmp_path):
    run = _make_run(tmp_path / "unfinished", final=False, records=[])
    doc = _check_document(report.run_index(run, title="Unfinished & <odd>"))
    assert doc.texts["h1"] == ["Unfinished & <odd>"]
    assert not _media(doc, "video") and "eval" not in doc.tables
    notes = " ".join(doc.texts["p"])
    assert "No final/" in notes and "No metrics recorded" in notes
    assert len(_media(doc, "img")) == 3  # the previews still show

    with pytest.raises(ValueError, match="final"):
        report.write_run_index(run)
    assert not (run / "final").exists()
    # An explicit destination is written all the same.
    written = report.write_run_index(run, tmp_path / "elsewhere" / "index.html")
    _check_document(written.read_text(encoding="utf-8"))


def test_run_index_of_an_empty_or_missing_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for directory in (empty, tmp_path / "missing"):
        doc = _check_document(report.run_index(directory))
        notes = " ".join(doc.texts["p"])
        assert "config.json" in notes and "No previews" in notes and "No final/" in notes
        assert not _media(doc, "img")


def test_run_index_tolerates_torn_and_constant_metrics(tmp_path):
    run = _make_run(tmp_path / "torn", final=False, records=[])
    lines = [json.dumps({"step": s, "sigma": 1.0, "finite": True}) for s in range(4)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "sig')
    doc = _check_document(report.run_index(run))
    notes = " ".join(doc.texts["p"])
    assert "4 steps recorded" in notes and "No metric varies" in notes
    (run / "config.json").write_text("{not json")
    doc = _check_document(report.run_index(run))
    assert "No readable config.json" in " ".join(doc.texts["p"])


def test_write_run_index_is_atomic(run_dir):
    path = report.write_run_index(run_dir)
    assert path == run_dir / "final" / "index.html"
    assert path.read_text(encoding="utf-8") == report.run_index(run_dir)
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["depth.mp4", "eval.json", "index.html", "turntable.mp4", "view.png"]


def _sweep(tmp_path: Path) -> tuple[list[dict], Path]:
    lifts = tmp_path / "sweep" / "lifts"
    rows = []
    for i, (seed, lr) in enumerate([(0, 0.05), (2, 0.01), (1, 0.1)]):
        name = f"lift-{i}" if i else "lift <0> & $co^$"
        finished = i != 2
        evaluation = {"psnr": 15.0 + i, "iou": 0.5 + 0.1 * i} if finished else None
        directory = _make_run(lifts / f"lift_{i}", final=finished, evaluation=evaluation, seed=seed)
        rows.append(
            {
                "lift": name,
                "dir": str(directory),
                "settings": {"seed": seed, "lr": lr, "scene": f"scene{i % 2}"},
                "metrics": {"opacity": 0.5 + i, "score_norm": 0.25 * i},
                "eval": evaluation,
            }
        )
    return rows, tmp_path / "sweep" / "report" / "sweep.html"


def test_sweep_report(tmp_path):
    rows, path = _sweep(tmp_path)
    assert report.write_sweep_report(rows, path, title="My sweep") == path
    text = path.read_text(encoding="utf-8")
    doc = _check_document(text)
    assert doc.texts["h1"] == ["My sweep"]

    table = doc.tables["lifts"]
    (head,) = table["head"]
    columns = ["seed", "lr", "scene", "psnr", "iou", "opacity", "score_norm"]
    assert head == ["lift", "view", *columns]
    sortable = [a for a in table["head_attrs"] if "sortable" in (a.get("class") or "")]
    assert len(sortable) == 1 + len(columns)
    numeric = [a.get("data-type") == "num" for a in table["head_attrs"]]
    assert numeric == [False, False, True, True, False, True, True, True, True]

    assert len(table["body"]) == len(rows)
    for cells, row in zip(table["body"], rows, strict=True):
        by_column = dict(zip(head, cells, strict=True))
        assert by_column["lift"] == row["lift"]
        assert by_column["seed"] == str(row["settings"]["seed"])
        assert by_column["lr"] == str(row["settings"]["lr"])
        assert by_column["score_norm"] == f"{row['metrics']['score_norm']:.4g}"
        expected = f"{row['eval']['psnr']:.4g}" if row["eval"] else ""
        assert by_column["psnr"] == expected
    assert "no view" in table["body"][2][1]

    # Links: each lift's final/index.html relative to the report; thumbnails where a view is.
    links = [a["href"] for t, a in doc.tags if t == "a"]
    for row in rows:
        index = Path(row["dir"]) / "final" / "index.html"
        relative = os.path.relpath(index, path.parent)
        assert relative.startswith("../lifts/")
        assert links.count(relative) == (2 if row["eval"] else 1)  # name (+ thumbnail)
        assert (path.parent / relative).resolve() == index.resolve()
    thumbs = [a for a in _media(doc, "img") if a.get("class") == "thumb"]
    assert len(thumbs) == 2

    (plot,) = [a for a in _media(doc, "img") if a.get("class") == "plot"]
    assert plot["alt"].startswith("opacity, score_norm of each lift")
    assert text.count("<script>") == 1


def test_sweep_report_without_base_curves_and_rows(tmp_path):
    rows, _ = _sweep(tmp_path)
    doc = _check_document(report.sweep_report(rows, curves=["sigma"]))
    links = {a["href"] for t, a in doc.tags if t == "a"}
    assert Path(rows[0]["dir"]).resolve().joinpath("final", "index.html").as_uri() in links
    (plot,) = [a for a in _media(doc, "img") if a.get("class") == "plot"]
    assert plot["alt"].startswith("sigma of each lift")

    # Lifts without metrics (or none at all) still render.
    bare = [{"lift": "x", "dir": str(tmp_path / "nowhere"), "settings": {}, "metrics": {}}]
    doc = _check_document(report.sweep_report(bare))
    assert len(doc.tables["lifts"]["body"]) == 1
    assert "No metric curves to overlay." in doc.texts["p"]
    doc = _check_document(report.sweep_report([], title="Empty"))
    assert "lifts" not in doc.tables and "No lifts." in doc.texts["p"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browse(
    browser: str, page: Path, profile: Path, *extra: str, webgl: bool = False
) -> subprocess.CompletedProcess:
    # WebGL in a headless browser without a GPU: SwiftShader, Chromium's CPU renderer.
    graphics = (
        ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"] if webgl else ["--disable-gpu"]
    )
    command = [
        browser,
        "--headless",
        *graphics,
        "--no-sandbox",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1200,900",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
def test_reports_render_in_headless_chromium(tmp_path):
    import imageio.v3 as imageio

    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium (chromium, chromium-browser or google-chrome) on PATH")
    rows, sweep_path = _sweep(tmp_path)
    report.write_sweep_report(rows, sweep_path)
    run_path = report.write_run_index(rows[0]["dir"])
    for page in (sweep_path, run_path):
        shot = tmp_path / f"{page.stem}.png"
        done = _browse(browser, page, tmp_path / f"profile-{page.stem}", f"--screenshot={shot}")
        assert "Uncaught" not in done.stderr, done.stderr[-4000:]
        assert shot.exists(), f"no screenshot of {page}: {done.stderr[-4000:]}"
        pixels = np.asarray(imageio.imread(shot), np.float64)
        assert pixels.std() > 0, f"blank screenshot of {page}"

    # Sort by seed (ascending, then descending) in the page itself; the order lands in the DOM.
    clicker = """<script>
    (function () {
      var th = Array.prototype.filter.call(document.querySelectorAll("#lifts th"),
        function (h) { return h.textContent.trim() === "seed"; })[0];
      var order = [];
      [0, 1].forEach(function () {
        th.click();
        order.push(Array.prototype.map.call(document.querySelectorAll("#lifts tbody tr"),
          function (r) { return r.cells[0].textContent.trim(); }).join("|"));
      });
      document.body.setAttribute("data-check", order.join(";"));
    })();
    </script></body>"""
    checked = sweep_path.with_name("check.html")
    checked.write_text(sweep_path.read_text(encoding="utf-8").replace("</body>", clicker))
    done = _browse(browser, checked, tmp_path / "profile-check", "--dump-dom")
    assert "Uncaught" not in done.stderr, done.stderr[-4000:]
    ascending = "|".join(rows[i]["lift"] for i in (0, 2, 1))
    descending = "|".join(rows[i]["lift"] for i in (1, 2, 0))
    doc = _parse(done.stdout)
    (body,) = [a for t, a in doc.tags if t == "body"]
    assert body.get("data-check") == f"{ascending};{descending}"


def _add_mesh(run: Path) -> None:
    import trimesh

    from sjc_jax.export import save_mesh

    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    rgb = (np.abs(ball.vertices) / 0.6 * 255).astype(np.uint8)
    colors = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    save_mesh(
        run / "final" / "mesh.ply",
        trimesh.Trimesh(ball.vertices, ball.faces, vertex_colors=colors, process=False),
    )
    info = {"level": 7.9, "rule": "silhouette", "pieces": 1, "faces": len(ball.faces)}
    (run / "final" / "mesh.json").write_text(json.dumps(info))


def test_run_index_shows_the_result_first(tmp_path):
    run = _make_run(tmp_path / "run")
    _add_mesh(run)
    text = report.run_index(run)
    doc = _check_document(text)
    order = doc.texts["h2"]
    assert order[:3] == ["Result", "Evaluation", "Metrics"] and order[-1] == "Config"
    (details,) = [a for t, a in doc.tags if t == "details"]
    assert "open" not in details  # the config is folded away
    (canvas,) = [a for t, a in doc.tags if t == "canvas"]
    positions = np.frombuffer(base64.b64decode(canvas["data-position"]), np.float32)
    colors = np.frombuffer(base64.b64decode(canvas["data-color"]), np.uint8)
    assert positions.size == colors.size == 9 * 1280  # 1280 faces, three corners each, unshared
    assert np.abs(np.linalg.norm(positions.reshape(-1, 3), axis=1) - 0.6).max() < 1e-5
    assert dict(map(tuple, doc.tables["mesh"]["body"]))["rule"] == "silhouette"
    assert "http" not in text.replace("http-equiv", "")  # no network


@pytest.mark.slow
def test_mesh_viewer_draws_in_headless_chromium(tmp_path):
    """The page's WebGL viewer draws the mesh (non-blank pixels read back by the page itself)
    with no console error; skipped where no Chromium is installed."""
    import imageio.v3 as imageio

    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium (chromium, chromium-browser or google-chrome) on PATH")
    run = _make_run(tmp_path / "run")
    _add_mesh(run)
    page = report.write_run_index(run)
    done = _browse(browser, page, tmp_path / "profile", "--dump-dom", webgl=True)
    errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not errors, done.stderr[-4000:]
    (canvas,) = [a for t, a in _parse(done.stdout).tags if t == "canvas"]
    assert int(canvas.get("data-drawn", "0")) > 1000, done.stderr[-4000:]
    shot = tmp_path / "page.png"
    done = _browse(browser, page, tmp_path / "profile2", f"--screenshot={shot}", webgl=True)
    assert shot.exists(), done.stderr[-4000:]
    assert np.asarray(imageio.imread(shot), np.float64).std() > 0
