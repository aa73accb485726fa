import numpy as np
import pytest

import henderson as hd

matplotlib = pytest.importorskip("matplotlib")


def test_caterpillar_and_residual_plots(tmp_path):
    m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    fig = m.plot_ranef("Subject", path=tmp_path / "cat.png")
    assert (tmp_path / "cat.png").stat().st_size > 5000
    ax = fig.axes[0]
    # the plotted points are the sorted intercept BLUPs
    xs = ax.lines[0].get_xdata() if ax.lines else ax.collections[0].get_offsets()[:, 0]
    assert np.allclose(np.sort(m.ranef["Subject"]["(Intercept)"]), xs)
    m.plot(path=tmp_path / "res.png")
    assert (tmp_path / "res.png").stat().st_size > 5000


def test_plot_ranef_draws_every_grouping_factor_and_coefficient():
    """plot_ranef() showed only the first grouping factor (issue 16)."""
    data = hd.datasets.load("sleepstudy").assign(
        Week=lambda d: (d["Days"] // 5).astype(str))
    m = hd.lmm("Reaction ~ Days + (Days | Subject) + (1 | Week)", data)
    fig = m.plot_ranef()
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["Subject: (Intercept)", "Subject: Days", "Week: (Intercept)"]
    week = [ax for ax in fig.axes if ax.get_title() == "Week: (Intercept)"][0]
    assert len(week.get_yticks()) == 2
    assert [ax.get_title() for ax in m.plot_ranef("Week").axes if ax.get_visible()] \
        == ["Week: (Intercept)"]
