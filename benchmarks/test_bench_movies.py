"""A movie-ratings-shaped problem (issue 15): ``y ~ 1 + (1 | user) + (1 | item)`` on two
crossed factors whose level frequencies follow power laws (henderson.simulate.ratings).

Full size (``HENDERSON_BENCH_SCALE=full``): 10M rows, 70,000 users x 10,000 items, the
shape of MovieLens 10M; the target is < 15 min and < 12 GB on the 2-core machine. CI
size: 1M rows, 7,000 x 1,000.
"""
import pytest

import henderson as hd
from henderson.simulate import ratings

from conftest import peak_gb, run_once


def test_ratings_crossed_power_law(benchmark, sizes):
    data = ratings(sizes["movie_rows"], sizes["movie_users"], sizes["movie_items"], seed=3)
    m = run_once(benchmark, hd.lmm, "y ~ 1 + (1 | user) + (1 | item)", data)
    # the simulated standard deviations: users 0.4, items 0.5, residual 0.9
    assert m.sigma == pytest.approx(0.9, rel=0.01)
    sd = m.varcorr.set_index("grp")["sdcor"]
    assert sd["user"] == pytest.approx(0.4, rel=0.05)
    assert sd["item"] == pytest.approx(0.5, rel=0.1)
    benchmark.extra_info.update(rows=len(data), evaluations=m.n_evaluations,
                                ordering=m.mme.ordering, peak_gb=round(peak_gb(), 2),
                                **{k: round(v, 4) for k, v in m.timings.items()})
