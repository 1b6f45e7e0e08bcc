"""Route demand classes to the GPU types that can serve them: the largest multiple λ of the demand mix a fleet
serves, with each GPU type's time split over the classes it can hold.

    maximise λ  subject to  Σ_c x[g,c] ≤ 1 (each GPU type's time)  and  Σ_g N_g·r[g,c]·x[g,c] ≥ λ·s_c (each class)

r[g,c] is one GPU's rate on class c (0 where it cannot serve it), s_c the class's share of demand tokens. A small
linear program (a few GPU types × a few classes), solved by scipy's HiGHS (`scipy.optimize.linprog`).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog


def route(rates: np.ndarray, counts: np.ndarray, shares: np.ndarray) -> tuple[float, np.ndarray]:
    """rates [G, C] tokens/s per GPU (0: cannot serve), counts [G], shares [C] (sum 1) ->
    (λ tokens/s of the mix the fleet serves, served [G, C] tokens/s each GPU type gives each class, at λ).
    ValueError when the program has no optimum (shares all 0: λ unbounded)."""
    G, C = rates.shape
    supply = rates * counts[:, None]  # [G, C] tokens/s if the whole type served that class
    # Variables x[g, c] (row-major), then λ, all ≥ 0 (linprog's default bounds); linprog minimises: cost −λ.
    cost = -np.eye(G * C + 1)[-1]
    time = np.hstack([np.kron(np.eye(G), np.ones(C)), np.zeros((G, 1))])  # Σ_c x[g,c] ≤ 1
    serve = np.hstack([*(np.diag(-supply[g]) for g in range(G)), shares[:, None]])  # λ·s_c − Σ_g supply·x ≤ 0
    res = linprog(cost, A_ub=np.vstack([time, serve]), b_ub=np.r_[np.ones(G), np.zeros(C)], method="highs")
    if res.status != 0:
        raise ValueError(f"routing: the linear program has no optimum: {res.message}")
    lam = res.x[-1]
    served = supply * res.x[:-1].reshape(G, C)
    # Each class counts its share of λ: at the optimum none gets less, and a surplus is idle for this mix.
    got = served.sum(axis=0)
    keep = np.divide(lam * shares, got, out=np.zeros(C), where=got > 0)
    return float(lam), served * keep[None, :]
