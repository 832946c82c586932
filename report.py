"""One page for the report: everything a run wrote, in the order of the study's report, as a single
self-contained HTML file that opens offline in any browser, with no server.

    python report.py                 # the run in OUTPUT_DIR / CHECKPOINT_DIR (run_all.py runs it last)

Reads:  the settings; outputs/class_counts.csv/.png, sample_images.png, model_summary.txt, the training
        curves, test_metrics.csv and the confusion matrix; then each stage's files as its
        outputs/provenance_<stage>.json names them (without one: the registry's output patterns);
        outputs/<method>_coordinates.csv (umap_, tsne_ or pca_: whichever dimensionality_reduction.py
        ran) and the images it names (thumbnails); checkpoints/best.pth (classes, data folder, trunk
        weights); outputs/stage_times.json.
Writes: outputs/report.html (figures as embedded PNGs, tables as HTML, the 2-d plane as an interactive Bokeh
        plot with its JavaScript and thumbnails inside the file), and last outputs/provenance_report.json.

Sections: settings, data overview, model summary, training curves, test metrics, then one section per
stage of plankton/registry.py's STAGES in order (its docstring's first paragraph, every figure, every
CSV table up to TABLE_ROWS rows), stage timings and provenance. A stage added to the registry appears
with no change here.
"""
import base64
import datetime
import html
import io
import json
import math
from pathlib import Path

import pandas as pd

from plankton import (
    checkpoints,
    embedding_files,
    fileio,
    images,
    locations,
    plots,
    projection,
    provenance,
    registry,
    runner,
    settings,
)
from plankton.errors import PipelineError

TABLE_ROWS = 30  # rows of a CSV table shown in the report (the file itself has them all)
TABLE_COLUMNS = 20  # columns shown at most (an embeddings table has 131)
THUMBNAIL_PX = 48  # longest side of the UMAP hover thumbnails, in pixels (smaller images stay as they are)
TEXT_LIMIT = 20_000  # a .txt output up to this many characters is shown as text; larger ones are linked
SHA_PREFIX = 12  # hex digits of each SHA-256 shown in the provenance table
HALF_ROW_PX = 1000  # a figure at most this many pixels wide is shown two to a row, scaled to fit
REPORT_NAME = "report.html"

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1250px;margin:0 auto;padding:0 24px 60px;
     color:#222;line-height:1.45}
h1{margin-top:28px} h2{border-bottom:2px solid #ccd;padding-bottom:4px;margin-top:42px} h3{margin:22px 0 6px}
nav{columns:3;font-size:14px;background:#f5f6fa;padding:10px 16px;border-radius:6px} nav a{display:block}
.warn{background:#fff1f0;border-left:4px solid #c0392b;padding:8px 12px}
.note{color:#555;font-style:italic} .explain{color:#333;background:#f7f7f2;padding:6px 10px;border-radius:4px}
.figures{display:flex;flex-wrap:wrap;gap:6px 18px;align-items:flex-start}
figure{margin:8px 0;max-width:100%} figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:13px;color:#555}
.scroll{overflow-x:auto;max-width:100%}
table.data{border-collapse:collapse;font-size:12.5px;margin:6px 0}
table.data th,table.data td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
table.data th{background:#f0f2f7} table.data td:first-child,table.data th:first-child{text-align:left}
tr.section td{background:#e8ebf3;font-weight:bold;text-align:left}
table.text td,table.text th{text-align:left;white-space:normal} details{margin:10px 0} summary{cursor:pointer;color:#235}
pre{font-size:11.5px;background:#fafafa;border:1px solid #eee;padding:8px;overflow-x:auto}
#umap-tapped{width:200px;flex:none;font-size:13px;padding:8px;border:1px solid #ddd;border-radius:4px;min-height:120px}
#umap-tapped img{width:144px;height:144px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccc}
.umap-row{display:flex;gap:14px;align-items:flex-start}
"""


# ---- small HTML pieces ---------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value))


def anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def section(title: str, body: str) -> str:
    return f'<section id="{anchor(title)}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def png_figure(path: Path) -> str:
    """A PNG inside the page; one up to HALF_ROW_PX wide shares its row with the next (see group_figures)."""
    from PIL import Image
    with Image.open(path) as img:
        width = img.size[0]
    layout = f"flex:1 1 560px;max-width:{width}px" if width <= HALF_ROW_PX else "flex:1 1 100%"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure style="{layout}"><img src="data:image/png;base64,{data}" alt="{esc(path.name)}">'
            f'<figcaption>{esc(path.name)}</figcaption></figure>')


def href(path: Path, base: Path | None) -> str:
    """The link from the page (in `base`, the output folder) to a file in it or in a sub-folder of it
    (predictions/x.csv), escaped for an attribute."""
    return esc(Path(path).relative_to(base).as_posix() if base is not None else Path(path).name)


def csv_table(path: Path, rows: int = TABLE_ROWS, columns: int = TABLE_COLUMNS, base: Path | None = None) -> str:
    """The first `rows` rows and `columns` columns of a CSV as an HTML table, saying what was left out."""
    try:
        frame = fileio.read_csv(path, nrows=rows)
    except (ValueError, OSError) as err:  # empty, ragged, not text
        return note(f"{path.name}: cannot be read as a table ({str(err).strip().splitlines()[0]})")
    with open(path, "rb") as handle:
        total = max(sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b"")) - 1, len(frame))
    shown = frame.iloc[:, :columns]
    parts = [f"first {len(frame)} of {total} rows" if total > len(frame) else f"{total} rows"]
    if frame.shape[1] > columns:
        parts.append(f"first {columns} of {frame.shape[1]} columns")
    table = shown.to_html(index=False, border=0, classes="data", na_rep="",
                          float_format=lambda v: f"{v:.4g}")
    return (f'<h3>{esc(path.name)}</h3><p class="note">{esc(", ".join(parts))} '
            f'(<a href="{href(path, base)}">the file</a>)</p><div class="scroll">{table}</div>')


def text_block(path: Path, base: Path | None = None) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    if len(text) > TEXT_LIMIT:
        return note(f"{path.name}: {len(text):,} characters, not shown here") + link_list([path], base)
    return f"<h3>{esc(path.name)}</h3><pre>{esc(text)}</pre>"


def link_list(paths: list[Path], base: Path | None = None) -> str:
    items = "".join(f'<li><a href="{href(p, base)}">{esc(p.name)}</a> ({p.stat().st_size:,} bytes)</li>' for p in paths)
    return f"<p>Other files (beside this page in the output folder):</p><ul>{items}</ul>" if paths else ""


def render_files(paths: list[Path], read: list[Path], base: Path, keep_order: bool = False) -> str:
    """Figures, then tables, then text (or the order given), then links to everything else; each
    file shown is added to `read`."""
    order = {".png": 0, ".csv": 1, ".txt": 2}
    shown, others = [], []
    ordered = paths if keep_order else sorted(paths, key=lambda p: (order.get(p.suffix, 3), p.name))
    for path in ordered:
        kind = order.get(path.suffix)
        if kind is None:
            others.append(path)
            continue
        shown.append(png_figure(path) if kind == 0 else csv_table(path, base=base) if kind == 1 else
                     text_block(path, base))
        read.append(path)
    return "\n".join(group_figures(shown)) + link_list(others, base)


def group_figures(parts: list[str]) -> list[str]:
    """Consecutive figures side by side where they fit (a flex row that wraps)."""
    grouped = []
    for part in parts:
        if part.startswith("<figure") and grouped and grouped[-1].startswith('<div class="figures">'):
            grouped[-1] = grouped[-1][:-len("</div>")] + part + "</div>"
        else:
            grouped.append(f'<div class="figures">{part}</div>' if part.startswith("<figure") else part)
    return grouped


# ---- the sections --------------------------------------------------------------------------------

def settings_section(cfg) -> str:
    """The settings that differ from configfile.py's defaults, then every setting with its value and
    comment by section of configfile.py (folded: click to open)."""
    docs, values, defaults = settings.setting_docs(), settings.settings_dict(cfg), settings.read_defaults()
    plain = json.loads(json.dumps(defaults, default=str))  # the defaults as settings_dict writes values
    rows, changed, heading = [], [], None
    for name, (group, comment) in docs.items():
        if name not in values:
            continue
        if group != heading:
            heading = group
            rows.append(f'<tr class="section"><td colspan="3">{esc(group)}</td></tr>')
        value = f"<td>{esc(name)}</td><td>{esc(repr(getattr(cfg, name)))}</td>"
        rows.append(f"<tr>{value}<td>{esc(comment)}</td></tr>")
        if values[name] != plain.get(name):
            changed.append(f"<tr>{value}<td>{esc(repr(defaults.get(name)))}</td><td>{esc(comment)}</td></tr>")
    summary = (f'<table class="data text"><tr><th>setting</th><th>value</th><th>default</th><th>meaning</th></tr>'
               f'{"".join(changed)}</table>' if changed else note("Every setting has configfile.py's default value."))
    return section("Settings", f"<p>{len(changed)} of {len(values)} settings differ from configfile.py's "
                               f"defaults:</p>{summary}<details><summary>All {len(values)} settings</summary>"
                               f'<div class="scroll"><table class="data text"><tr><th>setting</th><th>value</th>'
                               f'<th>meaning</th></tr>{"".join(rows)}</table></div></details>')


def front_sections(paths: locations.Paths, read: list[Path], skipped: list[str]) -> list[str]:
    """Data overview, model summary, training curves and test metrics, from their fixed files (those
    the run's task writes; a section with none of them says why)."""
    sections, out = [], paths.out
    for title, names in registry.front_sections():
        present = inside_output_folder(paths, [out / n for n in names])
        owners = dict.fromkeys(owner for p in present if (owner := registry.stage_of(p.name)))
        body = "".join(unvouched_warning(paths, owner, present) for owner in owners)
        body += render_files(present, read, out, keep_order=True)
        if not present:
            owners = sorted({registry.stage_of(n) for n in names} & set(skipped))
            why = (f"{', '.join(o + '.py' for o in owners)} did not run: not for this task (see plankton/registry.py)" if owners
                   else "run run_all.py, or the stage that writes them")
            body += note(f"Not in {out}: {', '.join(names)} ({why}).")
        sections.append(section(title, body))
    return sections


def inside_output_folder(paths: locations.Paths, files: list[Path]) -> list[Path]:
    """The files that are, after following links, inside the output folder: nothing from elsewhere
    is ever read into the page, whatever a record or a link in the folder names."""
    out = paths.out.resolve()
    return [f for f in files if f.is_file() and f.resolve().is_relative_to(out)]


def stage_files(paths: locations.Paths, stage: str) -> tuple[list[Path], str]:
    """A stage's output files, from its provenance record, else from its output patterns, and where
    the list came from."""
    try:
        record = provenance.read_record(paths, stage)
    except PipelineError:
        record = None  # stage_section says so: every output counts as unvouched
    if record is not None:
        return inside_output_folder(paths, [paths.out / n for n in record.outputs]), provenance.provenance_path(
            paths, stage).name
    found = inside_output_folder(paths, sorted(paths.out / n for n in provenance.existing_outputs(paths, stage)))
    return found, ("its output patterns (no record)" if registry.stage(stage).recorded
                   else f"{stage}.py's fixed file names (it keeps no record)")


def unvouched_warning(paths: locations.Paths, stage: str, shown: list[Path]) -> str:
    """A visible warning when files of a recorded stage are not vouched for by its provenance record
    (the record is missing or unreadable, an input changed since, or a file was replaced): the
    section may mix runs. "" when the record vouches for all of them."""
    if not registry.stage(stage).recorded:
        return ""
    stale = provenance.stale_outputs(paths, stage)
    if not stale:
        return ""
    try:
        record = provenance.read_record(paths, stage)
        why = "" if record is not None else f"there is no {provenance.provenance_path(paths, stage).name}"
    except PipelineError as err:
        why = str(err)
    names = [Path(p).relative_to(paths.out).as_posix() if Path(p).is_relative_to(paths.out) else p for p in stale]
    return (f'<p class="warn stale">Not vouched for: {len(stale)} of the files of {esc(stage)} were not made by its '
            f"recorded run from the current inputs ({esc(why or 'an input or the file changed since')}), so this "
            f"section may mix runs: {esc(', '.join(names[:6]))}{' …' if len(names) > 6 else ''}. "
            f"Re-run {esc(stage)}.py (or run_all.py).</p>")


def stage_section(paths: locations.Paths, entry: registry.Stage, front: dict, read: list[Path]) -> str:
    stage = entry.name
    files, source = stage_files(paths, stage)
    body = f'<p class="explain">{esc(entry.explanation())} <i>({esc(entry.script)})</i></p>'
    body += unvouched_warning(paths, stage, files)
    if not files:
        return section(entry.title, body + f'<p class="warn">No outputs of {esc(stage)} in {esc(paths.out)}: '
                                                 f"the stage has not run (python {esc(stage)}.py).</p>")
    above = [f for f in files if f.name in front]
    rest = [f for f in files if f.name not in front]
    if above:
        body += note("Shown above: " + ", ".join(f"{f.name} ({front[f.name]})" for f in above) + ".")
    body += note(f"{len(files)} files, listed by {source}.")
    if stage in INTERACTIVE:
        body += INTERACTIVE[stage](paths)
    return section(entry.title, body + render_files(rest, read, paths.out))


def stages_in_order(paths: locations.Paths, cfg) -> tuple[list[registry.Stage], list[str]]:
    """The registry's stages that run_all runs with these settings, then those run by hand (seeds.py)
    or on request (predict.py) whose outputs are there; all but the report. Also the names of the
    stages left out because they do not handle TASK."""
    stages = [s for s in registry.STAGES if s.name != "report"
              and (s.wanted(cfg) or provenance.existing_outputs(paths, s.name))]
    skipped = [s.name for s in stages if not s.handles(cfg.TASK)]
    return [s for s in stages if s.handles(cfg.TASK)], skipped


def timings_section(out: Path) -> str:
    path = out / "stage_times.json"
    if not path.is_file():
        return section("Stage timings", note(f"No {path.name} in {out}: run_all.py writes it."))
    try:
        times = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(times, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) and v >= 0 for v in times.values()):
            raise ValueError("not a map of stage to seconds")
    except (OSError, ValueError) as err:
        return section("Stage timings", f'<p class="warn">{esc(path.name)} cannot be read ({esc(err)}); run_all.py '
                                        f"writes it again.</p>")
    total = times.get("total") or sum(v for k, v in times.items() if k != "total")
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f}</td><td>{100 * v / total:.0f}%</td></tr>"
                   for k, v in times.items() if k != "total" and total)
    ending = (f"total {times['total']:.1f} s" if "total" in times
              else "stages so far, written while run_all.py was still running (this report is its last stage)")
    return section("Stage timings", note(f"Wall time of each stage ({path.name}; {ending}).")
                   + f'<table class="data"><tr><th>stage</th><th>seconds</th><th>share</th></tr>{rows}</table>')


def provenance_section(paths: locations.Paths, stages: list[str], read: list[Path]) -> str:
    """Per stage: code version, then each input and output with its SHA-256 prefix; then the package
    versions the stages recorded beside those installed now."""
    rows, versions = [], {}
    for stage in stages:
        path = provenance.provenance_path(paths, stage)
        try:
            record = provenance.read_record(paths, stage)
        except PipelineError as err:
            rows.append(f'<tr class="section"><td colspan="3" class="warn">{esc(err)}</td></tr>')
            continue
        if record is None:
            continue
        read.append(path)
        rows.append(f'<tr class="section"><td colspan="3">{esc(stage)} (code {esc(record.code_version)})</td></tr>')
        named = [("input", p, s) for p, s in record.inputs.items()]
        named += [("output", n, s) for n, s in record.outputs.items()]
        rows += [f'<tr><td>{role}</td><td style="text-align:left">{esc(name)}</td><td><code>{s[:SHA_PREFIX]}</code></td></tr>'
                 for role, name, s in named]
        for package, version in record.packages.items():
            versions.setdefault(package, set()).add(version)
    now = provenance.package_versions()
    package_rows = "".join(f"<tr><td>{esc(p)}</td><td>{esc(', '.join(sorted(versions.get(p, {'not recorded'}))))}</td>"
                           f"<td>{esc(v)}</td></tr>" for p, v in now.items())
    body = (note("SHA-256 prefixes of every file each stage read and wrote (python verify.py checks them all).")
            + '<div class="scroll"><table class="data text"><tr><th>role</th><th>file</th><th>SHA-256</th></tr>'
            + "".join(rows) + "</table></div><h3>Package versions</h3>"
            + '<table class="data"><tr><th>package</th><th>recorded by the stages</th><th>installed now</th></tr>'
            + package_rows + "</table>")
    return section("Provenance", body)


# ---- the interactive UMAP ------------------------------------------------------------------------

def thumbnail_uri(path: Path, size: int = THUMBNAIL_PX) -> str:
    """A data URI of the image shrunk to `size` pixels on its longest side (never enlarged): PNG, or
    JPEG (quality 80) where that is smaller, as it is for photographs. "" for an unreadable image."""
    try:
        img = images.load_rgb(path)
    except Exception:  # gone or unreadable since embed.py: the point keeps its class and path
        return ""
    img.thumbnail((size, size))
    encoded = []
    for kind, options in (("png", dict(optimize=True)), ("jpeg", dict(quality=80))):
        buffer = io.BytesIO()
        img.save(buffer, kind.upper(), **options)
        encoded.append((len(buffer.getvalue()), kind, buffer.getvalue()))
    _, kind, data = min(encoded)
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


TOOLTIP = """<div style="display:flex;gap:8px;align-items:center">
<img src="@thumb" alt="no image" width="48" height="48" style="image-rendering:pixelated;object-fit:contain;border:1px solid #ccc">
<div><b>@class_name</b> (@subset)<br><span style="font-size:10px">@path</span></div></div>"""
SHOW_TAPPED = """const i = source.selected.indices[0];
if (i === undefined) return;
const d = source.data, e = (s) => String(s).replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);
document.getElementById('umap-tapped').innerHTML =
  `<img src="${d.thumb[i]}" alt="no image"><br><b>${e(d.class_name[i])}</b> (${e(d.subset[i])})<br>${e(d.path[i])}`;"""
# Seen classes: circles (training points lighter than test points); unseen classes: triangles, as in the PNG.
MARKERS = {"train": dict(marker="circle", fill_alpha=0.45, line_alpha=0.0),
           "test": dict(marker="circle", fill_alpha=0.9, line_alpha=0.9),
           "unseen": dict(marker="triangle", fill_alpha=0.8, line_alpha=0.9)}
LEGEND_GREYS = {"train": "#c4c4c4", "test": "#505050", "unseen": "#8a8a8a"}  # the subset legend's markers


def umap_plot(coords: pd.DataFrame, colours: dict[str, str], method: str = "umap"):
    """A Bokeh scatter of the 2-d plane (of method: "umap", "tsne" or "pca"): one renderer per class and
    subset, so that a click on a class or subset in the legends hides it; hover shows the thumbnail,
    class, subset and path."""
    from bokeh.models import ColumnDataSource, CustomJS, HoverTool, Legend, LegendItem
    from bokeh.plotting import figure
    label, axis = projection.METHODS[method].label, projection.METHODS[method].axis
    nan = float("nan")  # the grey legend markers' one point, never drawn on the plane
    plot = figure(name="umap", width=960, height=680, tools="pan,wheel_zoom,box_zoom,reset,tap,save",
                  title=f"{label} of the embeddings: {len(coords)} points (hover: image; click: image at the right)",
                  x_axis_label=f"{axis} 1", y_axis_label=f"{axis} 2")
    class_items, by_subset, renderers = [], {}, []
    for name, colour in colours.items():
        mine = []
        for subset, style in MARKERS.items():
            part = coords[(coords.class_name == name) & (coords.subset == subset)]
            if not len(part):
                continue
            source = ColumnDataSource({c: part[c].tolist() for c in ("x", "y", "class_name", "subset", "path", "thumb")})
            source.selected.js_on_change("indices", CustomJS(args=dict(source=source), code=SHOW_TAPPED))
            mine.append(plot.scatter("x", "y", source=source, size=8, color=colour, **style))
            by_subset.setdefault(subset, []).append(mine[-1])
        if mine:
            count = int((coords.class_name == name).sum())
            class_items.append(LegendItem(label=f"{name} ({count})", renderers=mine))
            renderers += mine
    plot.add_layout(Legend(items=class_items, title="class (click: hide)", click_policy="hide"), "right")
    # a subset's legend entry: its renderers, then an empty grey one drawn over their glyphs (the entry's marker)
    subset_items = [LegendItem(label=s, renderers=r + [plot.scatter([nan], [nan], color=LEGEND_GREYS[s],
                                                                     **dict(MARKERS[s], fill_alpha=1.0))])
                    for s, r in by_subset.items()]
    plot.add_layout(Legend(items=subset_items, title="subset (click: hide)", click_policy="hide"), "right")
    plot.add_tools(HoverTool(tooltips=TOOLTIP, renderers=renderers))
    return plot


def interactive_umap(paths: locations.Paths) -> str:
    """The interactive plane (UMAP, t-SNE or PCA: whichever dimensionality_reduction.py ran, as its
    record says) with the thumbnails of its images, or a line saying why not."""
    method = embedding_files.projection_method(paths) or "umap"
    if not paths.coordinates(method).is_file() or not paths.best.is_file():
        return note(f"No interactive plane: {paths.coordinates(method).name} or best.pth is missing.")
    try:  # its owner reads it: refused unless dimensionality_reduction's provenance vouches for it
        coords = embedding_files.open_coordinates(paths, method)
    except PipelineError as err:
        return f'<p class="warn">No interactive {esc(projection.METHODS[method].label)}: {esc(err)}</p>'
    checkpoint = checkpoints.open_checkpoint(paths.best)
    return umap_html(coords, Path(checkpoint.data_dir), list(checkpoint.class_names), list(checkpoint.unseen_classes),
                     method)


def umap_html(coords: pd.DataFrame, root: Path, seen: list[str], unseen: list[str], method: str = "umap") -> str:
    """The Bokeh plot (its data inline; the library is in the page's head) with a panel for a clicked
    point, coloured as <method>_embeddings.png is (plots.class_colours)."""
    label = projection.METHODS[method].label
    from bokeh.embed import components
    from matplotlib.colors import to_hex
    inside = root.resolve()  # a path that leads out of the data folder (.., a link) gets no thumbnail
    coords = coords.assign(thumb=[thumbnail_uri(root / p) if (root / p).resolve().is_relative_to(inside) else ""
                                  for p in coords.path])
    colours = {c: to_hex(rgba) for c, rgba in plots.class_colours(seen, unseen).items()}
    script, div = components(umap_plot(coords, colours, method))
    missing = int((coords.thumb == "").sum())
    lost = note(f"{missing} images could not be read for thumbnails.") if missing else ""
    return (f"<h3>Interactive {esc(label)}</h3>{note(UMAP_HELP.format(figure=projection.figure_name(method)))}{lost}"
            f'<div class="umap-row">{div}<div id="umap-tapped"><i>Click a point to see its image here.</i>'
            f"</div></div>{script}")


UMAP_HELP = ("The plane of {figure}. Hover over a point for its image, class and subset; click a point "
             "to keep its image at the right; click a class or subset in the legends to hide or show it. Seen "
             "classes are circles (training points lighter), unseen classes triangles.")


def predict_warnings(paths: locations.Paths) -> str:
    """predict.py's warnings (an unknown flag resting on too few validation images or a weak open-set
    score), from predictions.json, each as a warning line."""
    found = inside_output_folder(paths, [paths.predictions_dir / "predictions.json"])
    try:
        lines = json.loads(found[0].read_text(encoding="utf-8")).get("warnings", [])
    except (IndexError, OSError, ValueError, AttributeError):
        return ""
    return "".join(f'<p class="warn">{esc(line)}</p>' for line in lines if isinstance(line, str)) \
        if isinstance(lines, list) else ""


def drift_verdict(paths: locations.Paths) -> str:
    """predict.py's drift verdict (predictions.json's "drift"), highlighted when it warns."""
    found = inside_output_folder(paths, [paths.predictions_dir / "predictions.json"])
    try:
        verdict = json.loads(found[0].read_text(encoding="utf-8"))["drift"]
        text, warns = str(verdict["verdict"]), bool(verdict["drift"])
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return note("No drift verdict in predictions.json (made before the drift check, or unreadable).")
    return f'<p class="{"warn" if warns else "explain"}"><b>Drift check:</b> {esc(text)}</p>'


# extra content at the top of a stage's section
INTERACTIVE = {"dimensionality_reduction": interactive_umap,
               "predict": lambda paths: drift_verdict(paths) + predict_warnings(paths)}


# ---- the page ------------------------------------------------------------------------------------

def header(paths: locations.Paths, unvouched: list[str]) -> str:
    """Title, where the run lives, a warning when the trunk was not ImageNet-pretrained, and one line
    naming the stages whose sections show files their provenance does not vouch for."""
    weights = ""
    if unvouched:
        weights += (f'<p class="warn stale">{len(unvouched)} stage(s) show files that their provenance record does not '
                    f"vouch for (made by another run, or from other inputs): {esc(', '.join(unvouched))}. Their "
                    f"sections say which files; run_all.py brings them up to date.</p>")
    if paths.best.is_file():
        source = checkpoints.open_checkpoint(paths.best).weights_source
        if not source.startswith("ImageNet"):
            weights += (f'<p class="warn">Trunk weights: {esc(source)}, not ImageNet-pretrained. These figures show '
                       f"what the pipeline does, not what a pretrained trunk's embeddings say.</p>")
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<h1>Plankton pipeline report</h1><p>Output folder <code>{esc(paths.out.resolve())}</code>, checkpoints "
            f"<code>{esc(paths.checkpoints.resolve())}</code>; made {made} by report.py (code "
            f"{esc(provenance.code_version())}).</p>{weights}")


def page(head: str, sections: list[str]) -> str:
    from bokeh.resources import Resources
    titles = [s.split("<h2>", 1)[1].split("</h2>", 1)[0] for s in sections]
    toc = "".join(f'<a href="#{anchor(html.unescape(t))}">{t}</a>' for t in titles)
    bokeh_js = Resources(mode="inline", components=["bokeh"]).render()  # the plotting library, inside the file
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Plankton pipeline report</title>'
            f"<style>{STYLE}</style>\n{bokeh_js}\n</head><body>\n{head}<nav>{toc}</nav>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def build_report(cfg, paths: locations.Paths, read: list[Path]) -> str:
    """The whole page; every file it shows is added to `read`."""
    stages, skipped = stages_in_order(paths, cfg)
    front = {n: title for title, names in registry.front_sections() for n in names}
    sections = [settings_section(cfg)] + front_sections(paths, read, skipped)
    sections += [stage_section(paths, stage, front, read) for stage in stages]
    if skipped:
        sections.append(section("Stages not run for this task", note(
            f"TASK={cfg.TASK!r}: {', '.join(n + '.py' for n in skipped)} analyse single-label runs only; "
            f"run_all.py skips them (see docs/multilabel.md).")))
    sections += [timings_section(paths.out), provenance_section(paths, [s.name for s in stages], read)]
    shown = {registry.stage_of(name) for _, names in registry.front_sections() for name in names} | {
        s.name for s in stages}
    unvouched = [s.name for s in registry.STAGES if s.name in shown and s.recorded
                 and provenance.stale_outputs(paths, s.name)]
    return page(header(paths, unvouched), sections)


def run(cfg) -> None:
    paths = locations.prepare_output_dirs(cfg)
    read: list[Path] = []
    document = build_report(cfg, paths, read)
    inputs = [paths.best] if paths.best.is_file() else []
    inputs += list(dict.fromkeys(p for p in read if p.is_file()))
    recorded = provenance.start_stage(paths, "report", inputs)
    target = paths.out / REPORT_NAME
    with fileio.atomic_path(target) as tmp:
        tmp.write_text(document, encoding="utf-8")
    provenance.save_provenance(paths, "report", recorded, [target], cfg)
    print(f"-> {target} ({target.stat().st_size / 1e6:.1f} MB; open it in any browser, no server needed)")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
