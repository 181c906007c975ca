"""Labels for the demo's scatter plots that do not overlap: several arms land within a few
hundredths of each other (slim, slim-spread, slim-no-identity, slim-no-yield on caesar), and a
fixed offset wrote their names over each other and past the axes' edge.

Imports only matplotlib (the caller's), so the layout is tested without torch.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

# offsets tried around a point, in points: nearest first, eight directions at each distance
_DISTANCES = (5, 12, 20, 30, 42, 56, 72)
_DIRECTIONS = [(math.cos(a), math.sin(a)) for a in
               (math.radians(d) for d in (30, 0, -30, 90, -90, 150, 180, 210))]


def _alignment(dx: float, dy: float) -> Tuple[str, str]:
    ha = "left" if dx > 0.3 else "right" if dx < -0.3 else "center"
    va = "bottom" if dy > 0.3 else "top" if dy < -0.3 else "center"
    return ha, va


def label_points(ax, points: Sequence[Tuple[float, float]], labels: Sequence[str],
                 colors: Sequence = None, fontsize: float = 8, marker_px: float = 6.0):
    """Write ``labels[i]`` next to ``points[i]`` (data coordinates) so that no label overlaps
    another label or a point's marker, and every label stays inside the axes: for each point,
    offsets at growing distance are tried in eight directions and the first that fits is
    kept (with a thin leader line when it is not the nearest ring); when none fits, the one
    that overlaps least. Call it after the axes' limits and the figure's layout are final
    (``tight_layout`` moves the axes, hence the points). Returns the annotations."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = ax.transData.transform(points)
    marks = [Bbox.from_bounds(x - marker_px, y - marker_px, 2 * marker_px, 2 * marker_px)
             for x, y in px]
    placed: List[Bbox] = []
    out = []

    def cost(box: Bbox) -> float:
        inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0
                  and box.y1 <= frame.y1)
        over = sum(_overlap(box, b) for b in placed + marks)
        return over + (0.0 if inside else 1e6)

    for i, (xy, label) in enumerate(zip(points, labels)):
        color = colors[i] if colors is not None else "black"
        probe = ax.annotate(label, xy, xytext=(0, 0), textcoords="offset points",
                            fontsize=fontsize)
        best = None
        for ring, dist in enumerate(_DISTANCES):
            for dx, dy in _DIRECTIONS:
                ha, va = _alignment(dx, dy)
                probe.set_position((dist * dx, dist * dy))
                probe.set_ha(ha)
                probe.set_va(va)
                box = probe.get_window_extent(renderer)
                c = cost(box)
                if best is None or c < best[0]:
                    best = (c, ring, (dist * dx, dist * dy), ha, va, box)
            if best[0] == 0.0:
                break
        probe.remove()
        _, ring, offset, ha, va, box = best
        arrow = dict(arrowstyle="-", color=color, lw=0.6, shrinkA=0, shrinkB=3) if ring else None
        out.append(ax.annotate(label, xy, xytext=offset, textcoords="offset points",
                               fontsize=fontsize, ha=ha, va=va, color=color,
                               arrowprops=arrow))
        placed.append(box)
    return out


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0
