"""Pictures for experiments: labelled image grids, similarity (or SGR) vs adaptation step, and method x step
image grids.

Both write PNGs and return the figure/image, so notebooks can show them inline (`display(fig)`).
Figures are built with `matplotlib.figure.Figure` (Agg), never through pyplot, so nothing leaks between calls.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure  # Agg rendering without pyplot: no global state, works headless
from PIL import Image, ImageDraw

from ..method.diffusion import tensor_to_images


def cell_size(width: int, scale: int | None = None, cell: int = 96) -> tuple[int, int]:
    """(size each image is drawn at before scaling, integer scale): small images (the toy's 32 px) are blown
    up to about ``cell`` px with crisp pixels; large ones (SD's 512 px) are shrunk to ``cell`` px."""
    if scale is not None:
        return width, scale
    if width >= cell:
        return cell, 1
    return width, max(1, cell // width)


def image_grid(images, rows: int, cols: int, scale: int | None = None, labels: list[str] | None = None,
               cell: int = 96) -> Image.Image:
    """Tile images (PIL or a [-1,1] tensor) into a rows x cols grid, optionally with row labels on the left.
    Each cell is about ``cell`` px wide (see :func:`cell_size`) unless ``scale`` is given."""
    if isinstance(images, torch.Tensor):
        images = tensor_to_images(images)
    size, scale = cell_size(images[0].size[0], scale, cell)
    if images[0].size[0] != size:
        images = [im.resize((size, round(im.size[1] * size / im.size[0])), Image.BICUBIC) for im in images]
    w, h = images[0].size
    pad = 0 if labels is None else 7 * max(len(s) for s in labels) // scale + 4
    grid = Image.new("RGB", (pad + cols * w, rows * h), (255, 255, 255))
    for k, im in enumerate(images[:rows * cols]):
        grid.paste(im, (pad + (k % cols) * w, (k // cols) * h))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if labels is not None:
        from PIL import ImageFont

        d, font = ImageDraw.Draw(grid), ImageFont.load_default(size=11)  # the bitmap default eats spaces
        for r, text in enumerate(labels[:rows]):
            d.text((2, r * h * scale + h * scale // 2 - 6), text, fill=(0, 0, 0), font=font)
    return grid


def plot_similarity_curves(rows: list[dict], metric: str = "M", concepts: list[str] | None = None,
                           methods: list[str] | None = None, extractor: str | None = None, path=None,
                           title: str | None = None, ncols: int = 4):
    """One panel per concept (plus 'all' for MSGR): mean over seeds vs step per method, 95% CI shaded.

    rows: `metrics.sgr_table` output. metric: 'M' (raw similarity of every run, the no-defense one included),
    'SGR', or 'MSGR' (one panel), or 'ACC' (the toy oracle's accuracy, its band clipped to [0, 1]).
    extractor: which one, when the rows hold several.
    """
    rows = [r for r in rows if r["metric"] == metric and extractor in (None, r.get("extractor"))]
    if not rows:
        raise ValueError(f"plot_similarity_curves: no rows with metric {metric!r} (extractor {extractor!r})")
    if len({r.get("extractor") for r in rows}) > 1:
        raise ValueError("plot_similarity_curves: rows of several extractors; pick one with extractor=")
    concepts = concepts or list(dict.fromkeys(r["concept"] for r in rows))
    methods = methods or list(dict.fromkeys(r["method"] for r in rows))
    ncols = min(ncols, len(concepts))
    nrows = math.ceil(len(concepts) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    extractor = rows[0].get("extractor") or ""
    label = {"M": f"similarity M ({extractor})" if extractor else "similarity M"}.get(metric, metric)
    for ax, concept in zip(axes.flat, concepts):
        for method in methods:
            pts = sorted((r["step"], r["mean"], r["ci95"]) for r in rows
                         if r["concept"] == concept and r["method"] == method)
            if not pts:
                continue
            steps, mean, ci = zip(*pts)
            line, = ax.plot(steps, mean, marker="o", ms=3, label=method)
            lo = [m - (0 if math.isnan(c) else c) for m, c in zip(mean, ci)]
            hi = [m + (0 if math.isnan(c) else c) for m, c in zip(mean, ci)]
            if metric == "ACC":  # an accuracy lies in [0, 1]: the band is drawn inside it (the tables keep ±)
                lo, hi = [max(0.0, v) for v in lo], [min(1.0, v) for v in hi]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(concept if metric != "MSGR" else "MSGR (mean over concepts)", fontsize=9)
        ax.set_xlabel("adaptation step", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(concepts):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def method_step_grid(snapshots: dict, steps: list[int] | None = None, index: int = 0, scale: int | None = None,
                     path=None) -> Image.Image:
    """Rows: methods, columns: adaptation steps; each cell is image `index` of that run's snapshot.

    snapshots: {method: AttackResult or {step: images}} (images as a [-1,1] tensor or PIL list). The same index
    has the same prompt and seed in every run, so the grid compares like with like.
    """
    runs = {m: getattr(s, "snapshots", s) for m, s in snapshots.items()}
    steps = steps or sorted(set.intersection(*(set(r) for r in runs.values())))
    if not steps:
        raise ValueError("method_step_grid: the runs share no snapshot step")
    cells = []
    for method, run in runs.items():
        for step in steps:
            if step not in run:
                raise KeyError(f"method_step_grid: {method!r} has no snapshot at step {step}")
            img = run[step][index]
            cells.append(img if isinstance(img, Image.Image) else tensor_to_images(img[None])[0])
    labels = list(runs)
    grid = image_grid(cells, len(runs), len(steps), scale=scale, labels=labels)
    size, scale = cell_size(cells[0].size[0], scale)
    return _with_header(grid, [f"step {s}" for s in steps], size * scale, path)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """text cut from the left behind '..' until it fits width pixels (its end, e.g. '#0', tells columns apart):
    titles of neighbouring columns must not overlap ('katsushika hokusai #0' -> '..ushika hokusai #0')."""
    if draw.textlength(text) <= width:
        return text
    while len(text) > 1 and draw.textlength(".." + text) > width:
        text = text[1:]
    return ".." + text


def _with_header(grid: Image.Image, headers: list[str], cell_w: int, path) -> Image.Image:
    """Add a row of column titles above a grid whose cells are cell_w wide (right-aligned block)."""
    pad = grid.width - cell_w * len(headers)
    out = Image.new("RGB", (grid.width, grid.height + 14), (255, 255, 255))
    out.paste(grid, (0, 14))
    d = ImageDraw.Draw(out)
    for k, text in enumerate(headers):
        d.text((pad + k * cell_w + 2, 1), _fit(d, text, cell_w - 4), fill=(0, 0, 0))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        out.save(path)
    return out


def write_report(folder, name: str, rows: list[dict], snapshots: dict | None = None, step: int | None = None,
                 index: int = 0) -> list[Path]:
    """Everything an experiment ends with, in one folder: the tidy table (CSV + markdown), the paper-style SGR
    table at `step` (default: the last), M / SGR / MSGR curves per extractor, and method x step grids.

    rows: `metrics.sgr_table` output (rows of several extractors may be concatenated).
    snapshots: {concept: {method: AttackResult or {step: images}}} for the grids (optional).
    """
    from .metrics import paper_table, write_table

    folder = Path(folder)
    written = list(write_table(rows, folder, name))
    step = max(r["step"] for r in rows) if step is None else step
    for ext in dict.fromkeys(r.get("extractor", "") for r in rows):
        sub = [r for r in rows if r.get("extractor", "") == ext]
        tag = f"{name}_{ext}" if ext else name
        if any(r["metric"] == "SGR" for r in sub):
            written += list(write_table(paper_table(sub, step), folder, f"{tag}_sgr_step{step}"))
        for metric in ("M", "SGR", "MSGR"):
            if any(r["metric"] == metric for r in sub):
                path = folder / f"{tag}_{metric.lower()}.png"
                plot_similarity_curves(sub, metric, path=path, title=f"{name}: {metric} ({ext or 'similarity'})")
                written.append(path)
    for concept, runs in (snapshots or {}).items():
        path = folder / f"{name}_grid_{concept.replace(' ', '_')}.png"
        method_step_grid(runs, index=index, path=path)
        written.append(path)
    return written


# ---------------------------------------------------------------- notebook pictures
def labelled_grid(images, row_labels: list[str], col_labels: list[str], cell: int = 96, path=None) -> Image.Image:
    """A rows x cols grid (row-major images) with a label on every row and a title on every column."""
    if isinstance(images, torch.Tensor):
        images = tensor_to_images(images)
    rows, cols = len(row_labels), len(col_labels)
    if len(images) < rows * cols:
        raise ValueError(f"labelled_grid: {len(images)} images for {rows} x {cols} cells")
    grid = image_grid(images, rows, cols, labels=list(row_labels), cell=cell)
    size, scale = cell_size(images[0].size[0], None, cell)
    return _with_header(grid, list(col_labels), size * scale, path)


def plot_lines(panels: dict, xlabel: str, ylabel: str, title: str | None = None, ncols: int = 3,
               percent: bool = False, path=None) -> Figure:
    """One panel per key of ``panels`` = {panel title: {line label: {x: y}}}; a legend in each panel."""
    if not panels:
        raise ValueError("plot_lines: no panels")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.8 * ncols, 2.9 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for label, pts in lines.items():
            xs = sorted(pts)
            ax.plot(xs, [100 * pts[x] if percent else pts[x] for x in xs], marker="o" if len(xs) < 15 else None,
                    ms=3, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel + (" (%)" if percent else ""), fontsize=8)
        if percent:
            ax.set_ylim(-5, 105)
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_bars(groups: dict, ylabel: str, title: str | None = None, percent: bool = False, log: bool = False,
              path=None) -> Figure:
    """Grouped bars: ``groups`` = {group on the x axis: {bar label: value}}, e.g. {concept: {'before': a,
    'after': b}}; each bar carries its value. ``log``: a log-scale axis (for errors of very different sizes)."""
    if not groups:
        raise ValueError("plot_bars: no groups")
    labels = list(dict.fromkeys(k for bars in groups.values() for k in bars))
    fig = Figure(figsize=(max(4.0, 1.1 * len(groups) * len(labels) ** 0.5 + 1.5), 3.0))
    ax = fig.subplots()
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        vals = [groups[g].get(label, float("nan")) * (100 if percent else 1) for g in groups]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, fmt="%.1f" if percent else "%.3g", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def png_bytes(item) -> bytes:
    """PNG bytes of a PIL image or a matplotlib Figure."""
    import io

    buf = io.BytesIO()
    if isinstance(item, Image.Image):
        item.save(buf, format="PNG")
    elif hasattr(item, "savefig"):
        item.savefig(buf, format="png", dpi=110)
    else:
        raise TypeError(f"png_bytes: a PIL image or a Figure, got {type(item).__name__}")
    return buf.getvalue()


def show(*items) -> None:
    """Display pictures inline as PNG (a Figure made without pyplot has no inline form of its own)."""
    from IPython.display import Image as IPImage, display

    for item in items:
        display(IPImage(data=png_bytes(item), format="png"))
