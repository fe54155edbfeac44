"""Figures a person would rather look at than read: training curves and weight distributions,
as PNG files (matplotlib, the `plot` extra).  Each has a title, labelled axes, and its legend
outside the axes, where it never hides a line."""

import logging

from espresso.errors import EspressoError

log = logging.getLogger("espresso")


def pyplot():
    """matplotlib's pyplot, drawing to files (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EspressoError("plotting needs matplotlib: pip install espresso-nn[plot]") from None
    return plt


def curves_figure(losses, tests, title="Training curves"):
    """The smoothed train loss, and each test output, against iterations: losses on the left
    axis, the other scores (accuracy) on the right."""
    plt = pyplot()
    fig, loss_axis = plt.subplots(figsize=(8, 5))
    lines = []
    if losses:
        lines += loss_axis.plot(*zip(*losses), color="C0", lw=0.8, alpha=0.8, label="train loss (smoothed)")
    score_axis = None
    for k, name in enumerate(tests[-1][1] if tests else ()):
        points = [(i, scores[name]) for i, scores in tests if name in scores]
        if "loss" not in name and score_axis is None:
            score_axis = loss_axis.twinx()
            score_axis.set_ylabel("test score")
        axis = loss_axis if "loss" in name else score_axis  # losses share the loss scale
        lines += axis.plot(*zip(*points), marker="o", ms=3, color=f"C{k + 1}", label=f"test {name}")
    loss_axis.set(title=title, xlabel="iteration", ylabel="loss")
    fig.legend(handles=lines, loc="lower center", ncol=max(len(lines), 1), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the axes
    return fig


def plot_curves(losses, tests, path, title="Training curves"):
    save(curves_figure(losses, tests, title), path)


def save(fig, path, dpi=100):
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    log.info("Wrote %s", path)
