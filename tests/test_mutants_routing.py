"""Oracles for tokenfleet.capacity.routing (`make mutate`'s survivors): λ and each type's split worked out by hand
for small fleets, the closed forms of one type (harmonic mean by share) and one class (supplies add), the surplus a
class does not count, and the error when the program has no optimum. Not computed by the code under test."""

import numpy as np
import pytest
from tokenfleet.capacity.routing import route


def test_two_types_two_classes_by_comparative_advantage():
    # A: 4 tok/s on class 1, 2 on class 2; B: 1 and 3; one GPU each, shares ½ ½. A is relatively better at class 1,
    # B at class 2: B serves class 2 only, A gives class 2 the time t that balances the classes:
    # 4(1−t) = 2t + 3 → t = 1/6, each class 10/3 tok/s → λ = 20/3.
    lam, served = route(np.array([[4.0, 2.0], [1.0, 3.0]]), np.array([1.0, 1.0]), np.array([0.5, 0.5]))
    assert lam == pytest.approx(20 / 3, rel=1e-12)
    np.testing.assert_allclose(served, [[10 / 3, 1 / 3], [0.0, 3.0]], rtol=1e-12, atol=1e-12)


def test_counts_multiply_rates():
    # The same fleet with 3 A and 2 B: supplies A (12, 6), B (2, 6); B all on class 2 (6), A splits
    # 12(1−t) = 6t + 6 → t = 1/3, each class 8 → λ = 16.
    lam, served = route(np.array([[4.0, 2.0], [1.0, 3.0]]), np.array([3.0, 2.0]), np.array([0.5, 0.5]))
    assert lam == pytest.approx(16, rel=1e-12)
    np.testing.assert_allclose(served, [[8.0, 2.0], [0.0, 6.0]], rtol=1e-12, atol=1e-12)


def test_one_type_serves_the_harmonic_mean_by_share():
    rates, shares = np.array([[100.0, 25.0, 40.0]]), np.array([0.2, 0.3, 0.5])
    lam, served = route(rates, np.array([7.0]), shares)
    want = 7 / (0.2 / 100 + 0.3 / 25 + 0.5 / 40)  # time per token adds up over the classes
    assert lam == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(served, [want * shares], rtol=1e-12)


def test_one_class_sums_the_types():
    lam, served = route(np.array([[3.0], [0.5], [0.0]]), np.array([2.0, 4.0, 9.0]), np.array([1.0]))
    assert lam == pytest.approx(8.0, rel=1e-12)
    np.testing.assert_allclose(served, [[6.0], [2.0], [0.0]], rtol=1e-12, atol=0)


def test_rates_below_one_token_per_second():
    lam, served = route(np.array([[0.5]]), np.array([1.0]), np.array([1.0]))
    assert lam == pytest.approx(0.5, rel=1e-12)
    assert served[0, 0] == pytest.approx(0.5, rel=1e-12)


def test_a_class_surplus_is_not_counted():
    # A serves only class 1 (10 tok/s), B only class 2 (1 tok/s): λ = 2, limited by B; A has time to spare, and
    # whatever of it goes to class 1 counts only class 1's share of λ (1 tok/s).
    lam, served = route(np.array([[10.0, 0.0], [0.0, 1.0]]), np.array([1.0, 1.0]), np.array([0.5, 0.5]))
    assert lam == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(served, [[1.0, 0.0], [0.0, 1.0]], rtol=1e-12, atol=1e-12)


def test_a_class_with_no_share_and_no_server_gets_zero_not_nan():
    lam, served = route(np.array([[2.0, 0.0]]), np.array([3.0]), np.array([1.0, 0.0]))
    assert lam == pytest.approx(6.0, rel=1e-12)
    assert served.tolist() == [[pytest.approx(6.0, rel=1e-12), 0.0]]


def test_no_gpus_serve_nothing():
    lam, served = route(np.array([[5.0, 1.0]]), np.array([0.0]), np.array([0.5, 0.5]))
    assert lam == 0.0 and served.tolist() == [[0.0, 0.0]]


def test_nothing_demanded_has_no_optimum():
    with pytest.raises(ValueError, match=r"^routing: the linear program has no optimum: The problem is unbounded"):
        route(np.array([[5.0]]), np.array([1.0]), np.array([0.0]))


def test_random_fleets_split_time_validly():
    """Seeded random fleets: every class gets exactly λ·s_c, no type spends more than all its time, no type serves a
    class it cannot hold, and λ is at least what the best single split by shares gives (each type's time split in
    proportion to shares/rate: a feasible point, so a lower bound on the optimum)."""
    rng = np.random.default_rng(25)
    for _ in range(30):
        G, C = rng.integers(1, 5), rng.integers(1, 5)
        rates = rng.lognormal(6, 2, (G, C)) * (rng.random((G, C)) > 0.3)
        counts = rng.integers(1, 1000, G).astype(float)
        shares = rng.random(C) + 0.01
        shares /= shares.sum()
        lam, served = route(rates, counts, shares)
        supply = rates * counts[:, None]
        np.testing.assert_allclose(served.sum(axis=0), lam * shares, rtol=1e-9)
        assert (served >= 0).all() and (served[supply == 0] == 0).all()
        time = np.divide(served, supply, out=np.zeros_like(served), where=supply > 0)
        assert (time.sum(axis=1) <= 1 + 1e-9).all()
        if (supply > 0).all():  # every type on the whole mix alone: harmonic means add up (a feasible routing)
            assert lam >= (1 / (shares / supply).sum(axis=1)).sum() * (1 - 1e-9)
