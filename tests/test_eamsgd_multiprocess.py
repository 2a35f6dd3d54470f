"""EAMSGD against Algorithm 2 of the EASGD paper, stepped in NumPy (2 nodes x 1 rank).

Zhang, Choromanska, LeCun, NIPS 2015, Algorithm 2, synchronous over the p = 2 workers: on an
elastic step the worker first moves towards the center with the difference formed at its
point x (not at the look-ahead x + delta v), the center moves by alpha times the sum of the
differences, then the Nesterov step takes the gradient at x_a = x + delta v.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpi_harness import run_ranks

pytestmark = pytest.mark.multiprocess

ETA, DELTA, ALPHA, TAU = 0.05, 0.9, 0.3, 2


def test_eamsgd_follows_algorithm_2(tmp_path):
    results = run_ranks("eamsgd", 2, "1", tmp_path)
    data = [(r["inputs"].double().numpy(), r["labels"].double().numpy()) for r in results]
    x = [r["initial"].double().numpy() for r in results]
    v = [np.zeros_like(xi) for xi in x]
    center = x[0].copy()

    def grad(i, w):  # d/dw of mean((X w - y)^2)
        inputs, labels = data[i]
        return 2 * inputs.T @ (inputs @ w - labels[:, 0]) / len(labels)

    for t in range(6):
        if (t + 1) % TAU == 0:
            diffs = [xi - center for xi in x]
            x = [xi - ALPHA * d for xi, d in zip(x, diffs)]
            center = center + ALPHA * sum(diffs)
        for i in range(2):
            look_ahead = x[i] + DELTA * v[i]
            v[i] = DELTA * v[i] - ETA * grad(i, look_ahead)
            x[i] = x[i] + v[i]
        for i, result in enumerate(results):  # torch's parameter is the look-ahead point
            got = result["params"][t].double().numpy()
            np.testing.assert_allclose(got, x[i] + DELTA * v[i], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                result["centers"][t].double().numpy(), center, rtol=1e-5, atol=1e-6
            )
