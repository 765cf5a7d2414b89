"""The duplicate-groups report: one self-contained static HTML page.

Thumbnails are small JPEGs embedded as data: URIs, so the page can be copied, mailed or served
from a bucket without the images next to it. A short script at the end counts the thumbnails
the browser actually decoded and shows (and records in the body's data-images-* attributes)
how many loaded, which is how a reviewer, and the tests, tell a broken page from a good one.
"""

from __future__ import annotations

import base64
import html
import io
import re
import tarfile
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq

from rdcd.preprocess import decode_image
from rdcd.storage import StorageOptions, get_filesystem, get_pyarrow_filesystem, strip_protocol

_ROW = re.compile(r"^(?P<url>.+)#row=(?P<row>\d+)$")
_TAR = re.compile(r"^tar://(?P<member>.+?)::(?P<url>.+)$")


@dataclass
class Tile:
    """One image in the page: a thumbnail (data URI, or None when unreadable) and captions."""

    image_id: str
    thumb: str | None
    caption: str
    keeper: bool = False
    note: str = ""


@dataclass
class GroupView:
    group_id: str
    size: int
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class PairView:
    score: float
    above: bool
    exact: bool
    left: Tile
    right: Tile


def read_image_bytes(uri: str, options: StorageOptions | None, bytes_column: str) -> bytes:
    """The raw bytes behind a descriptors uri: a file/object URL, a tar member
    (tar://member::url) or a Parquet row (url#row=N, image bytes in bytes_column)."""
    row = _ROW.match(uri)
    if row:
        url = row["url"]
        table = pq.read_table(
            strip_protocol(url),
            columns=[bytes_column],
            filesystem=get_pyarrow_filesystem(url, options),
        )
        return table[bytes_column][int(row["row"])].as_py()
    member = _TAR.match(uri)
    if member:
        url = member["url"]
        with get_filesystem(url, options).open(strip_protocol(url), "rb") as handle:
            with tarfile.open(fileobj=handle) as archive:
                extracted = archive.extractfile(member["member"])
                if extracted is None:
                    raise OSError(f"{uri}: not a regular tar member")
                return extracted.read()
    if "::" in uri:
        with fsspec.open(uri, "rb") as handle:
            return handle.read()
    with get_filesystem(uri, options).open(strip_protocol(uri), "rb") as handle:
        return handle.read()


def thumbnail(data: bytes, px: int, max_pixels: int) -> str:
    """A data: URI of a JPEG thumbnail whose longer side is at most px."""
    img = decode_image(data, max_pixels=max_pixels, target_size=px, draft=True)
    img.thumbnail((px, px))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}
table.summary td{padding:.1em .8em .1em 0}
.group,.pair{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.8em 0}
.tiles{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
.tile{width:var(--px);font-size:.75em;word-break:break-all}
.tile img{max-width:var(--px);max-height:var(--px);display:block;border:3px solid #ccc}
.tile.keeper img{border-color:#1a7f37}
.badge{display:inline-block;background:#1a7f37;color:#fff;border-radius:3px;padding:0 .4em}
.missing{width:var(--px);height:calc(var(--px)*.6);background:#eee;display:flex;
align-items:center;justify-content:center;color:#888;border:3px dashed #ccc}
.score{font-weight:600}.above{color:#1a7f37}.below{color:#b35900}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) loaded++;
  }
  document.body.setAttribute('data-images-total', images.length);
  document.body.setAttribute('data-images-loaded', loaded);
  document.getElementById('status').textContent =
    loaded + ' of ' + images.length + ' thumbnails loaded';
});
"""


def _tile(tile: Tile) -> str:
    e = html.escape
    picture = (
        f'<img src="{tile.thumb}" alt="{e(tile.image_id)}">'
        if tile.thumb
        else '<div class="missing">unreadable</div>'
    )
    badge = '<span class="badge">KEEP</span> ' if tile.keeper else ""
    note = f"<br>{e(tile.note)}" if tile.note else ""
    return (
        f'<div class="tile{" keeper" if tile.keeper else ""}" title="{e(tile.image_id)}">'
        f"{picture}{badge}{e(tile.image_id)}<br>{e(tile.caption)}{note}</div>"
    )


def render(
    title: str,
    summary: dict[str, str],
    groups: list[GroupView],
    pairs: list[PairView],
    threshold: float,
    thumb_px: int,
) -> str:
    """The whole page as one HTML string."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in summary.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head>",
        f'<body style="--px:{int(thumb_px)}px">',
        f"<h1>{e(title)}</h1>",
        f'<table class="summary">{rows}</table>',
        '<p id="status">thumbnails loading...</p>',
        f"<h2>Duplicate groups ({len(groups)} shown)</h2>",
    ]
    for group in groups:
        shown = len(group.tiles)
        more = f", {group.size - shown} more not shown" if group.size > shown else ""
        parts.append(
            f'<div class="group" data-group-id="{e(group.group_id)}">'
            f"<div>group {e(group.group_id)} &middot; {group.size} images{more}</div>"
            f'<div class="tiles">{"".join(_tile(t) for t in group.tiles)}</div></div>'
        )
    parts.append(
        f"<h2>Borderline pairs near the threshold {threshold:.3f} ({len(pairs)} shown)</h2>"
    )
    for pair in pairs:
        side = "above" if pair.above else "below"
        label = "duplicate" if pair.above else "not a duplicate"
        exact = " (exact copy)" if pair.exact else ""
        parts.append(
            f'<div class="pair"><div class="score {side}">score {pair.score:.4f}: '
            f"{label}{exact}</div>"
            f'<div class="tiles">{_tile(pair.left)}{_tile(pair.right)}</div></div>'
        )
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)
