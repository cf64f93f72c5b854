"""Terminal charts as pure functions: points in, lines of unicode braille out.

A braille character is a 2x4 grid of dots (U+2800 + an 8-bit mask), so a chart `width` characters wide
and `height` rows tall has 2*width columns and 4*height rows of dots. Points are bucketed by column (a
long run is averaged down to one value per dot column) and consecutive columns are joined by a vertical
run of dots so a steep fall still reads as a line. Two charts of the same size overlay by OR-ing their
masks (`overlay`), which is how train and validation loss share one plot.

`History` keeps a run's (step, value) points in bounded memory with O(1) amortized appends: when it is
full it averages neighbouring pairs, so a 100k-step run still costs at most `cap` points to draw.
"""

from __future__ import annotations

from collections.abc import Sequence

BRAILLE_BLANK = 0x2800
# Dot bit for (column dx in 0..1, row dy in 0..3 from the top) inside one braille cell (Unicode order).
_DOT_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))

Point = tuple[float, float]


def downsample(points: Sequence[Point], n_buckets: int, x_range: tuple[float, float]) -> list[float | None]:
    """Mean y of the points falling in each of `n_buckets` equal slices of `x_range` (None where empty)."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    x0, x1 = x_range
    span = x1 - x0
    sums = [0.0] * n_buckets
    counts = [0] * n_buckets
    for x, y in points:
        if y != y or y in (float("inf"), float("-inf")):  # NaN/inf: nothing sensible to draw
            continue
        i = 0 if span <= 0 else round((x - x0) / span * (n_buckets - 1))
        if 0 <= i < n_buckets:
            sums[i] += y
            counts[i] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def braille_chart(points: Sequence[Point], width: int, height: int,
                  x_range: tuple[float, float] | None = None,
                  y_range: tuple[float, float] | None = None) -> list[str]:
    """Draw `points` (x, y) as a line chart of `height` strings, each `width` braille characters.

    `x_range`/`y_range` default to the points' own extent; pass shared ranges to overlay charts. Larger
    y is drawn higher. An empty series gives blank braille cells of the same size.
    """
    if width < 1 or height < 1:
        raise ValueError(f"chart size must be at least 1x1, got {width}x{height}")
    cols, rows = 2 * width, 4 * height
    cells = [[0] * width for _ in range(height)]
    finite = [(x, y) for x, y in points if y == y and abs(y) != float("inf")]
    if finite:
        if x_range is None:
            x_range = (min(x for x, _ in finite), max(x for x, _ in finite))
        if y_range is None:
            y_range = (min(y for _, y in finite), max(y for _, y in finite))
        lo, hi = y_range
        ys = downsample(finite, cols, x_range)

        def row_of(y: float) -> int:
            if hi <= lo:
                return rows // 2
            r = round((hi - y) / (hi - lo) * (rows - 1))
            return min(rows - 1, max(0, r))

        def dot(c: int, r: int) -> None:
            cells[r // 4][c // 2] |= _DOT_BITS[c % 2][r % 4]

        prev: tuple[int, int] | None = None
        for c, y in enumerate(ys):
            if y is None:
                continue
            r = row_of(y)
            if prev is None:
                dot(c, r)
            else:
                # Join from the previous drawn column: interpolate across empty columns and fill each
                # column's vertical run from the last row, so a steep fall has no holes.
                c0, r0 = prev
                last = r0
                for cc in range(c0 + 1, c + 1):
                    rc = round(r0 + (r - r0) * (cc - c0) / (c - c0))
                    for rr in range(min(last, rc), max(last, rc) + 1):
                        dot(cc, rr)
                    last = rc
            prev = (c, r)
    return ["".join(chr(BRAILLE_BLANK + m) for m in row) for row in cells]


def overlay(*charts: list[str]) -> list[str]:
    """OR together braille charts of the same size (dots of every chart appear)."""
    if not charts:
        return []
    shape = (len(charts[0]), [len(r) for r in charts[0]])
    for ch in charts[1:]:
        if (len(ch), [len(r) for r in ch]) != shape:
            raise ValueError("overlay needs charts of the same width and height")
    return ["".join(chr(BRAILLE_BLANK | _mask(cs)) for cs in zip(*rows)) for rows in zip(*charts)]


def _mask(chars: Sequence[str]) -> int:
    m = 0
    for ch in chars:
        m |= ord(ch) - BRAILLE_BLANK
    return m


def dots(ch: str) -> int:
    """The number of dots set in one braille character (0 for a blank or a non-braille character)."""
    code = ord(ch) - BRAILLE_BLANK
    return bin(code).count("1") if 0 <= code <= 0xFF else 0


class History:
    """(x, y) points in at most `cap` slots of equal weight, with O(1) amortized appends.

    Each slot holds the mean of `stride` raw points; when the slots are full, neighbouring pairs are
    merged and `stride` doubles. The slot being filled shows as its running mean, so the newest point
    is always drawn.
    """

    def __init__(self, cap: int = 1024):
        if cap < 2 or cap % 2:
            raise ValueError(f"History cap must be an even number >= 2, got {cap}")
        self.cap = cap
        self.stride = 1
        self.points: list[Point] = []
        self._sum = (0.0, 0.0, 0)  # the slot being filled: sum x, sum y, count

    def append(self, x: float, y: float) -> None:
        sx, sy, n = self._sum
        sx, sy, n = sx + x, sy + y, n + 1
        if n >= self.stride and len(self.points) >= self.cap:
            # Full: merge neighbours (built aside and swapped in, so a reader in another thread sees
            # the old list or the new one); the slot just filled keeps filling at the doubled stride.
            pts = self.points
            self.points = [((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in zip(pts[::2], pts[1::2])]
            self.stride *= 2
        if n < self.stride:
            self._sum = (sx, sy, n)
            return
        self._sum = (0.0, 0.0, 0)
        self.points.append((sx / n, sy / n))

    def drop_after(self, x: float) -> None:
        """Forget points beyond `x` (a resumed run redoes those steps)."""
        self.points = [p for p in self.points if p[0] <= x]
        self._sum = (0.0, 0.0, 0)

    def __len__(self) -> int:
        return len(self.points) + (self._sum[2] > 0)

    def __iter__(self):
        pts = list(self.points)
        sx, sy, n = self._sum
        if n:
            pts.append((sx / n, sy / n))
        return iter(pts)
