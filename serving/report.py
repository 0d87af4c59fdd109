"""A portable retrieval report: each query with its top-k results, as HTML and as one PNG.

Relevant results are framed green, irrelevant ones red (grey where relevance is unknown),
with the AP of each query and the mean over the queries that have one. Every side file (the
thumbnails and the PNG of the grid) goes in one folder named after the page, ``<name>_files/``,
referenced by relative paths, so the page can be moved or zipped with its folder; nothing else
is written beside the page. Each query's results wrap to the page width. Pillow only.

Example:
    >>> write_report(
    ...     "out/report.html",
    ...     queries=["q/cat.jpg"],
    ...     results=[["db/cat2.jpg", "db/dog.jpg"]],
    ...     relevance=[[True, False]],
    ...     ap=[1.0],
    ...     title="cats",
    ... )
    PosixPath('out/report.html')   # and out/report_files/report.png, out/report_files/*.jpg
"""

from __future__ import annotations

import hashlib
import html
import io
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from remap_tf.contract import REPORT_MARKER
from remap_tf.errors import InvalidInputError
from remap_tf.io import atomic_write_bytes
from remap_tf.outputs import report_files_dir

GREEN = (34, 160, 60)
RED = (210, 40, 40)
GREY = (150, 150, 150)
BLUE = (40, 90, 200)


def _open_thumbnail(source, box, size: int) -> Image.Image:
    """The image (cropped to ``box`` = (x1, y1, x2, y2) when given) fitted in size x size."""
    try:
        if isinstance(source, bytes | bytearray):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        image = ImageOps.exif_transpose(image).convert("RGB")
        if box is not None:
            x1, y1, x2, y2 = (float(v) for v in box)
            image = image.crop((int(x1), int(y1), int(math.ceil(x2)), int(math.ceil(y2))))
        image.thumbnail((size, size))
        return image
    except (OSError, ValueError, SyntaxError):
        image = Image.new("RGB", (size, size), (235, 235, 235))
        ImageDraw.Draw(image).text((8, size // 2 - 6), "unreadable", fill=(90, 90, 90))
        return image


def _label(item) -> str:
    if isinstance(item, bytes | bytearray):
        return f"<{len(item)} bytes>"
    return str(item)


def _frame(image: Image.Image, colour, width: int, size: int) -> Image.Image:
    """The thumbnail centred on a size x size tile with a coloured frame."""
    tile = Image.new("RGB", (size + 2 * width, size + 2 * width), colour)
    inner = Image.new("RGB", (size, size), (255, 255, 255))
    inner.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    tile.paste(inner, (width, width))
    return tile


def _colour(relevant) -> tuple[int, int, int]:
    if relevant is None:
        return GREY
    return GREEN if bool(relevant) else RED


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def write_report(
    path: str | os.PathLike,
    queries: Sequence,
    results: Sequence[Sequence],
    relevance: Sequence[Sequence[bool | None]] | None = None,
    ap: Sequence[float | None] | None = None,
    title: str = "Retrieval results",
    extra_sections_html: str | None = None,
    scores: Sequence[Sequence[float]] | None = None,
    query_boxes: Sequence | None = None,
    query_names: Sequence[str] | None = None,
    result_names: Sequence[Sequence[str]] | None = None,
    thumb_size: int = 128,
    png: bool = True,
    max_png_queries: int = 50,
) -> Path:
    """Writes the HTML report (and a PNG of the same grid) for ranked retrieval results.

    Args:
        path: the .html file to write; thumbnails and the PNG (``<stem>.png``) go to
            ``<stem>_files/`` beside it.
        queries: (num_queries,) query images: paths (str/Path) or encoded bytes.
        results: per query, the ranked result images (paths or bytes), best first.
        relevance: per query and result, True (green frame), False (red) or None (grey,
            unknown). None: all unknown.
        ap: (num_queries,) average precision per query (None/NaN: not evaluated).
        title: page title.
        extra_sections_html: trusted HTML inserted after the summary (e.g. a metrics table).
        scores: per query and result, the similarity shown under each thumbnail.
        query_boxes: per query, None or (x1, y1, x2, y2) to crop the query to.
        query_names: per query, the caption (default: the query path).
        result_names: per query and result, the caption (default: the result path), e.g.
            the ids an index knows the images by.
        thumb_size: thumbnail side in pixels.
        png: also write ``<stem>_files/<stem>.png``.
        max_png_queries: queries drawn in the PNG (the HTML has them all).

    Returns:
        The path of the HTML file.
    """
    path = Path(path)
    _check_lengths(
        len(queries),
        results=results,
        relevance=relevance,
        ap=ap,
        scores=scores,
        query_boxes=query_boxes,
        query_names=query_names,
        result_names=result_names,
    )
    files = report_files_dir(path)
    written = _Written(files)
    rows = dict(
        relevance=relevance,
        ap=ap,
        scores=scores,
        query_boxes=query_boxes,
        query_names=query_names,
        result_names=result_names,
        title=title,
        extra_sections_html=extra_sections_html,
        max_png_queries=max_png_queries,
    )
    try:
        _write_files_then_page(path, files, written, queries, results, thumb_size, png, **rows)
    except BaseException:
        written.remove()  # a failed report (a full disk, Ctrl-C) leaves no new file behind
        raise
    return path


def _write_files_then_page(path, files, written, queries, results, thumb_size, png, **rows):
    """The thumbnails and the PNG, then the page last: the page appears only when whole and
    every file it points at is in place."""
    thumbnails = _Thumbnails(files, thumb_size, written)
    rows_html, png_rows = [], []
    for qi in range(len(queries)):
        names = rows["query_names"]
        q_name = names[qi] if names is not None else _label(queries[qi])
        q_ap = rows["ap"][qi] if rows["ap"] is not None else None
        row_html, tiles = _query_row(
            thumbnails,
            queries[qi],
            q_name,
            q_ap,
            box=_nth(rows["query_boxes"], qi),
            results=results[qi],
            names=_nth(rows["result_names"], qi),
            relevance=_nth(rows["relevance"], qi),
            scores=format_scores(rows["scores"][qi]) if rows["scores"] is not None else None,
        )
        rows_html.append(row_html)
        png_rows.append((q_name, q_ap, tiles))
    summary = _summary(len(queries), rows["ap"])
    page = _page(rows["title"], summary, rows["extra_sections_html"], rows_html, thumb_size)
    if png and png_rows:
        png_path = files / f"{path.stem}.png"
        written.add(png_path)
        rows_png = png_rows[: rows["max_png_queries"]]
        _write_png(png_path, rows["title"], summary, rows_png, thumb_size)
    written.add(path)
    atomic_write_bytes(path, page.encode("utf-8"))


def _nth(per_query, qi):
    return per_query[qi] if per_query is not None else None


class _Written:
    """The files and folders a report creates (not those it replaces), to remove if it fails
    half-way: the old report, if any, stays as it was."""

    def __init__(self, folder: Path):
        self.new_folder = None  # the outermost folder of `folder`'s path that is not there yet
        while not folder.exists() and folder != folder.parent:
            self.new_folder, folder = folder, folder.parent
        self.created: list[Path] = []

    def add(self, path: Path) -> None:
        if not path.exists():
            self.created.append(path)

    def remove(self) -> None:
        for path in self.created:
            path.unlink(missing_ok=True)
        if self.new_folder is not None:
            shutil.rmtree(self.new_folder, ignore_errors=True)


def _summary(num_queries: int, ap) -> str:
    valid = [float(a) for a in (ap or []) if a is not None and not math.isnan(float(a))]
    summary = f"{num_queries} queries"
    if valid:
        summary += f"; mAP {np.mean(valid):.4f} over the {len(valid)} with an AP"
    return summary


def _check_lengths(num_queries: int, **per_query) -> None:
    for name, value in per_query.items():
        if name == "results" and len(value) != num_queries:
            raise InvalidInputError(f"{len(value)} result lists for {num_queries} queries")
        if value is not None and len(value) != num_queries:
            raise InvalidInputError(f"{name} has {len(value)} entries for {num_queries} queries")


class _Thumbnails:
    """Writes each distinct thumbnail once into ``folder``; hands out (relative path, image)."""

    def __init__(self, folder: Path, size: int, written: _Written):
        self.folder = folder
        self.size = size
        self.written = written
        self._cache: dict[tuple, tuple[str, Image.Image]] = {}

    def __call__(self, item, box=None) -> tuple[str, Image.Image]:
        box_key = tuple(box) if box is not None else None
        if isinstance(item, bytes | bytearray):
            key = ("bytes", hashlib.sha1(item).hexdigest(), box_key)
        else:
            key = ("path", str(Path(item).resolve()), box_key)
        if key not in self._cache:
            image = _open_thumbnail(item, box, self.size)
            name = hashlib.sha1(repr(key).encode()).hexdigest()[:16] + ".jpg"
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            self.written.add(self.folder / name)
            atomic_write_bytes(self.folder / name, buffer.getvalue())
            self._cache[key] = (f"{self.folder.name}/{name}", image)
        return self._cache[key]


def _query_row(thumbnails, query, name, ap, *, box, results, names, relevance, scores):
    """One query's table row (HTML) and its tiles for the PNG."""
    q_rel, q_image = thumbnails(query, box)
    cells = [
        f'<figure class="query"><img src="{html.escape(q_rel)}" alt="query">'
        f"<figcaption><b>query</b><br><span class=name>{html.escape(name)}</span><br>"
        f"AP {_fmt(ap)}</figcaption></figure>"
    ]
    tiles = [(q_image, BLUE)]
    for rank, item in enumerate(results):
        rel = relevance[rank] if relevance is not None else None
        r_rel, r_image = thumbnails(item)
        score = f" · {scores[rank]}" if scores is not None else ""
        caption = names[rank] if names is not None else _label(item)
        css = "rel" if rel else ("unk" if rel is None else "irr")
        cells.append(
            f'<figure class="{css}"><img src="{html.escape(r_rel)}" alt="rank {rank + 1}">'
            f"<figcaption>#{rank + 1}{score}<br><span class=name>{html.escape(caption)}</span>"
            "</figcaption></figure>"
        )
        tiles.append((r_image, _colour(rel)))
    return '<div class="row">' + "".join(cells) + "</div>", tiles


def _page(title: str, summary: str, extra_sections_html, rows_html, thumb_size: int) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{REPORT_MARKER}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
div.row {{ display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 14px; }}
figure {{ margin: 0; width: {thumb_size + 8}px; text-align: center; font-size: 12px;
          overflow-wrap: anywhere; }}
figure img {{ max-width: {thumb_size}px; max-height: {thumb_size}px; border: 4px solid #999; }}
figure.query img {{ border-color: rgb{BLUE}; }}
figure.rel img {{ border-color: rgb{GREEN}; }}
figure.irr img {{ border-color: rgb{RED}; }}
.name {{ color: #555; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}. Frames: <span style="color:rgb{BLUE}">blue = query</span>,
<span style="color:rgb{GREEN}">green = relevant</span>,
<span style="color:rgb{RED}">red = not relevant</span>, grey = unknown.</p>
{extra_sections_html or ""}
{chr(10).join(rows_html)}
</body></html>
"""


def format_scores(scores, max_digits: int = 6) -> list[str]:
    """Scores with just enough decimals (3 to ``max_digits``) that different values print
    differently: a weak model's similarities of 0.99981 and 0.99994 must not both read 1.000.
    """
    values = [float(v) for v in scores]
    for digits in range(3, max_digits + 1):
        texts = [f"{v:.{digits}f}" for v in values]
        distinct = {v for v in values}
        if len(set(texts)) == len(distinct):
            return texts
    return [f"{v:.{max_digits}f}" for v in values]


def _write_png(path: Path, title: str, summary: str, rows, size: int) -> None:
    frame = 4
    tile = size + 2 * frame
    gap, caption, header = 6, 16, 40
    columns = max(len(tiles) for _, _, tiles in rows)
    width = gap + columns * (tile + gap)
    height = header + len(rows) * (tile + caption + gap) + gap
    canvas = Image.new("RGB", (max(width, 400), height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 6), title, fill=(0, 0, 0))
    draw.text((gap, 22), summary, fill=(60, 60, 60))
    y = header
    for name, q_ap, tiles in rows:
        draw.text((gap, y), f"{name[-60:]}  AP {_fmt(q_ap)}", fill=(0, 0, 0))
        for column, (image, colour) in enumerate(tiles):
            canvas.paste(
                _frame(image, colour, frame, size), (gap + column * (tile + gap), y + caption)
            )
        y += tile + caption + gap
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
