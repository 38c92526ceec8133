"""Small charts without plotting libraries: a Unicode braille line chart for the terminal and a
line chart PNG (pure Python: ``zlib`` + ``struct``).

Both take ``[(x, y), ...]`` points (a roll-out's convergence curve: seconds since the start and
the fraction e(t) of targets not yet converged) and scale y to ``[0, y_max]``::

    for line in braille_chart(points, width=40, height=6):
        print(line)
    Path("curve.png").write_bytes(line_chart_png(points))
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

Point = tuple[float, float]

# braille dot bits by (column, row) inside a 2x4 cell (U+2800 + bits)
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
_BRAILLE = 0x2800

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GRID = (225, 225, 225)
LINE = (31, 119, 180)


def clean(points: Sequence[Sequence[float]]) -> list[Point]:
    """Finite ``(x, y)`` pairs sorted by x (anything else is dropped)."""
    out: list[Point] = []
    for p in points:
        if len(p) < 2:
            continue
        x, y = p[0], p[1]
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float)) \
                or not isinstance(y, (int, float)) or not (math.isfinite(x) and math.isfinite(y)):
            continue
        out.append((float(x), float(y)))
    out.sort(key=lambda p: p[0])
    return out


def _x_span(points: list[Point]) -> tuple[float, float]:
    lo, hi = points[0][0], points[-1][0]
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _sample(points: list[Point], x: float) -> float:
    """y at ``x`` by linear interpolation (clamped at the ends)."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def _fmt_seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f}h"
    if value >= 120:
        return f"{value / 60:.0f}m"
    if value >= 10:
        return f"{value:.0f}s"
    return f"{value:.1f}s" if value >= 1 or value == 0 else f"{value:.2g}s"


def braille_chart(points: Sequence[Sequence[float]], *, width: int = 40, height: int = 6,
                  y_max: float = 1.0, label: str = "e(t)") -> list[str]:
    """The curve as ``height`` text rows of ``width`` braille cells, with a y axis (0..y_max) and
    an x axis labelled with its first and last x in seconds. No points: one ``(no data)`` line."""
    pts = clean(points)
    if not pts:
        return [f"{label}: (no data)"]
    width, height = max(4, width), max(2, height)
    cols, rows = width * 2, height * 4
    lo, hi = _x_span(pts)
    top = y_max if y_max > 0 else 1.0
    cells = [[0] * width for _ in range(height)]

    def dot(px: int, py: int) -> None:     # py 0 = bottom
        if 0 <= px < cols and 0 <= py < rows:
            r = height - 1 - py // 4
            cells[r][px // 2] |= _DOTS[px % 2][3 - py % 4]

    prev: int | None = None
    for px in range(cols):
        x = lo + (hi - lo) * px / (cols - 1)
        y = min(max(_sample(pts, x), 0.0), top)
        py = round(y / top * (rows - 1))
        if prev is None:
            dot(px, py)
        else:                               # join to the previous column: no gaps on steep drops
            for v in range(min(prev, py), max(prev, py) + 1):
                dot(px, v)
        prev = py
    ticks = {0: f"{top:.1f}", height - 1: "0.0"}
    pad = max(len(t) for t in ticks.values())
    lines = [f"{label}"]
    for r in range(height):
        axis = "┤" if r in ticks else "│"
        lines.append(f"{ticks.get(r, ''):>{pad}} {axis}" + "".join(chr(_BRAILLE + c) for c in cells[r]))
    lines.append(" " * pad + " └" + "─" * width)
    first, last = _fmt_seconds(lo), _fmt_seconds(hi)
    lines.append(" " * (pad + 2) + first + " " * max(1, width - len(first) - len(last)) + last)
    return lines


# -- PNG ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """Where the plot area sits in the image and how data maps onto it."""

    width: int
    height: int
    left: int
    top: int
    right: int
    bottom: int
    x_lo: float
    x_hi: float
    y_max: float

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """Image ``(column, row)`` of a data point (row 0 at the top)."""
        fx = (x - self.x_lo) / (self.x_hi - self.x_lo)
        fy = min(max(y / self.y_max, 0.0), 1.0)
        col = self.left + round(fx * (self.right - self.left))
        row = self.bottom - round(fy * (self.bottom - self.top))
        return col, row


def frame_for(points: Sequence[Sequence[float]], *, width: int = 480, height: int = 240,
              y_max: float = 1.0) -> Frame:
    """The :class:`Frame` :func:`line_chart_png` uses for these points and size."""
    pts = clean(points) or [(0.0, 0.0), (1.0, 0.0)]
    lo, hi = _x_span(pts)
    return Frame(width, height, left=40, top=12, right=width - 16, bottom=height - 24,
                 x_lo=lo, x_hi=hi, y_max=y_max if y_max > 0 else 1.0)


# 3x5 glyphs for axis labels (rows top to bottom, 3 bits each)
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "s": (0, 3, 6, 1, 6),
    "m": (0, 0, 7, 7, 5), "h": (4, 4, 7, 5, 5),
}


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.px = bytearray(bytes(WHITE) * (width * height))

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.px[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], thick: int = 1) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for t in range(thick):
                self.set(x0, y0 - t, color)
                self.set(x0 + t, y0, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int] = BLACK, scale: int = 2) -> None:
        for ch in s:
            glyph = _GLYPHS.get(ch)
            if glyph is not None:
                for r, bits in enumerate(glyph):
                    for c in range(3):
                        if bits & (4 >> c):
                            for a in range(scale):
                                for b in range(scale):
                                    self.set(x + c * scale + a, y + r * scale + b, color)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[r * self.width * 3:(r + 1) * self.width * 3])
                       for r in range(self.height))
        return encode_png(self.width, self.height, raw)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, filtered_rows: bytes) -> bytes:
    """A truecolour 8-bit PNG from its filtered scanlines (each row: a filter byte + RGB bytes)."""
    if len(filtered_rows) != height * (1 + 3 * width):
        raise ValueError("scanlines do not match the image size")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(filtered_rows, 9))
            + _chunk(b"IEND", b""))


def line_chart_png(points: Sequence[Sequence[float]], *, width: int = 480, height: int = 240,
                   y_max: float = 1.0) -> bytes:
    """A PNG line chart: light grid at quarters of y, black axes with labels, the curve in blue."""
    if not (120 <= width <= 4000 and 80 <= height <= 4000):
        raise ValueError("chart size must be 120..4000 x 80..4000 pixels")
    pts = clean(points)
    f = frame_for(pts, width=width, height=height, y_max=y_max)
    c = _Canvas(width, height)
    for q in range(1, 5):
        row = f.bottom - round(q / 4 * (f.bottom - f.top))
        c.line(f.left, row, f.right, row, GRID)
    for q in range(1, 5):
        col = f.left + round(q / 4 * (f.right - f.left))
        c.line(col, f.top, col, f.bottom, GRID)
    c.line(f.left, f.top, f.left, f.bottom, BLACK)
    c.line(f.left, f.bottom, f.right, f.bottom, BLACK)
    for q in range(5):                       # ticks on both axes
        row = f.bottom - round(q / 4 * (f.bottom - f.top))
        c.line(f.left - 4, row, f.left, row, BLACK)
        col = f.left + round(q / 4 * (f.right - f.left))
        c.line(col, f.bottom, col, f.bottom + 4, BLACK)
    c.text(4, f.top - 4, f"{f.y_max:.1f}")
    c.text(4, f.bottom - 4, "0.0")
    c.text(f.left - 4, f.bottom + 8, _fmt_seconds(f.x_lo))
    last = _fmt_seconds(f.x_hi)
    c.text(f.right - 8 * len(last), f.bottom + 8, last)
    prev: tuple[int, int] | None = None
    for x, y in pts:
        here = f.pixel(x, y)
        if prev is None:
            c.set(*here, LINE)
        else:
            c.line(*prev, *here, LINE, thick=2)
        prev = here
    return c.png()


__all__ = ["Frame", "braille_chart", "clean", "encode_png", "frame_for", "line_chart_png"]
