"""EASGD's stability result (Zhang et al. 2015, section 5) on the real update code."""

from __future__ import annotations

import pytest
import torch

from daso.strategies.easgd import apply_elastic, elastic_difference


def run_map(eta: float, alpha: float, steps: int = 3000) -> float:
    """F(x) = x^2 / 2, exact gradients, one worker exchanging with the center every step
    (p = 1, beta = alpha): the optimizer's SGD step plus the strategy's elastic functions."""
    x = torch.nn.Parameter(torch.tensor([1.0]))
    center = torch.tensor([0.5])
    optimizer = torch.optim.SGD([x], lr=eta)
    for _ in range(steps):
        optimizer.zero_grad()
        (x**2 / 2).sum().backward()
        difference = elastic_difference(x.detach().clone(), center)
        optimizer.step()
        with torch.no_grad():
            apply_elastic(x.data, center, difference, difference, alpha)
        size = max(abs(float(x.detach())), abs(float(center)))
        if size > 1e6:
            break
    return size


def boundary(eta: float) -> float:
    return (4 - 2 * eta) / (4 - eta)


@pytest.mark.parametrize("eta", [0.2, 0.8, 1.4, 1.9])
def test_stable_inside_the_region(eta):
    for alpha in (0.05 * boundary(eta), 0.5 * boundary(eta), boundary(eta) - 0.03):
        assert run_map(eta, alpha) < 1e-3, (eta, alpha)


@pytest.mark.parametrize("eta", [0.2, 0.8, 1.4, 1.9])
def test_unstable_outside_the_region(eta):
    assert run_map(eta, boundary(eta) + 0.03) > 1e3, eta


def test_unstable_for_eta_above_two():
    assert run_map(2.05, 0.01) > 1e3


def test_nesterov_point_recovers_sutskevers_x_from_torchs_look_ahead():
    """PyTorch's Nesterov SGD keeps x + delta v in its parameters; stepped beside Sutskever's
    form in NumPy (EASGD paper, Algorithm 2: x_a = x + delta v, v <- delta v - eta g(x_a),
    x <- x + v), ``nesterov_point`` must give back x, not the look-ahead."""
    import numpy as np

    from daso.comm import FlatBuffer
    from daso.strategies.easgd import nesterov_point

    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    hessian = a @ a.T / 6 + np.eye(6)
    eta, delta = 0.05, 0.9
    x = rng.normal(size=6)
    v = np.zeros(6)
    param = torch.nn.Parameter(torch.tensor(x, dtype=torch.float64))
    optimizer = torch.optim.SGD([param], lr=eta, momentum=delta, nesterov=True)
    state = FlatBuffer([param], dtype=torch.float64)
    h = torch.tensor(hessian)
    for _ in range(8):
        x_a = x + delta * v
        v = delta * v - eta * (hessian @ x_a)
        x = x + v
        optimizer.zero_grad()
        (0.5 * param @ h @ param).backward()
        optimizer.step()
        np.testing.assert_allclose(param.detach().numpy(), x + delta * v, rtol=1e-10)
        np.testing.assert_allclose(nesterov_point(state, optimizer).numpy(), x, rtol=1e-10)
