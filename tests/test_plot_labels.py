"""The demo plots' point labels (slim_kernels/demo/plotting.py): no two overlap, none covers a
point, all stay inside the axes; on the caesar results, where four SLIM arms lie within 0.13
of each other and a fixed offset wrote their names over each other (docs/demo_plot_caesar.png
before the fix), and on a denser synthetic cluster."""
import random

import pytest

matplotlib = pytest.importorskip("matplotlib")  # in the [test] and [demo] extras
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from slim_kernels.demo.plotting import label_points  # noqa: E402

# (new-task accuracy, retention) of the README's caesar table
CAESAR = {"lora": (0.969, 0.227), "slim": (1.0, 0.496), "slim-spread": (0.875, 0.484),
          "slim-no-identity": (0.969, 0.449), "slim-no-yield": (0.938, 0.438),
          "slim+merge": (0.469, 0.477), "full": (0.984, 0.273)}
_rng = random.Random(0)
CLUSTER = {f"arm-{i}": (0.8 + 0.08 * _rng.random(), 0.4 + 0.08 * _rng.random())
           for i in range(10)}


def _panel():
    """The demo's retention panel: its size, limits and layout (benchmark.write_plot)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.1)
    return fig, ax


def _layout(fig, ax, texts, points):
    """(label boxes, axes box, point pixels) as drawn. A label's box is its text's, without
    its leader line (Annotation.get_window_extent would include the line)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return ([Text.get_window_extent(t, r) for t in texts], ax.get_window_extent(r),
            ax.transData.transform(points))


def _overlaps(boxes):
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])]


def test_the_check_sees_the_old_overlapping_labels():
    """The old placement (every name at +4, +4 points) overlaps on the caesar results."""
    fig, ax = _panel()
    points = list(CAESAR.values())
    ax.scatter(*zip(*points))
    fig.tight_layout()
    texts = [ax.annotate(n, p, xytext=(4, 4), textcoords="offset points", fontsize=8)
             for n, p in CAESAR.items()]
    boxes, _, _ = _layout(fig, ax, texts, points)
    assert _overlaps(boxes)
    plt.close(fig)


@pytest.mark.parametrize("arms", [CAESAR, CLUSTER], ids=["caesar", "dense-cluster"])
def test_labels_do_not_overlap_and_stay_inside_the_axes(arms):
    fig, ax = _panel()
    points = list(arms.values())
    colors = [ax.scatter(x, y, s=50).get_facecolor()[0] for x, y in points]
    fig.tight_layout()
    texts = label_points(ax, points, list(arms), colors)
    assert [t.get_text() for t in texts] == list(arms)
    boxes, frame, pixels = _layout(fig, ax, texts, points)
    assert not _overlaps(boxes), [(texts[i].get_text(), texts[j].get_text())
                                  for i, j in _overlaps(boxes)]
    for t, b in zip(texts, boxes):
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1, \
            f"{t.get_text()} is outside the axes"
        covered = [n for n, (x, y) in zip(arms, pixels) if b.contains(x, y)]
        assert not covered, f"{t.get_text()} covers the point of {covered}"
    plt.close(fig)
