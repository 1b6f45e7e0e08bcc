"""Route demand classes to the GPU types that can serve them: the largest multiple λ of the demand mix a fleet
serves, with each GPU type's time split over the classes it can hold.

    maximise λ  subject to  Σ_c x[g,c] ≤ 1 (each GPU type's time)  and  Σ_g N_g·r[g,c]·x[g,c] ≥ λ·s_c (each class)

r[g,c] is one GPU's rate on class c (0 where it cannot serve it), s_c the class's share of demand tokens. A small
linear program (a few GPU types × a few classes), solved by a dense simplex with Bland's rule (no scipy needed).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def simplex_max(c: np.ndarray, A: np.ndarray, b: np.ndarray, max_iter: int = 10_000) -> np.ndarray:
    """argmax c·x subject to A·x ≤ b, x ≥ 0, for b ≥ 0 (the origin is feasible). Bland's rule avoids cycling."""
    m, n = A.shape
    T = np.zeros((m + 1, n + m + 1))
    T[:m, :n], T[:m, n:n + m], T[:m, -1] = A, np.eye(m), b
    T[-1, :n] = -c
    basis = list(range(n, n + m))
    for _ in range(max_iter):
        entering = next((j for j in range(n + m) if T[-1, j] < -EPS), None)
        if entering is None:
            break
        col = T[:m, entering]
        ratios = [(T[i, -1] / col[i], basis[i], i) for i in range(m) if col[i] > EPS]
        if not ratios:
            raise ValueError("unbounded linear program")
        _, _, row = min(ratios)
        T[row] /= T[row, entering]
        for i in range(m + 1):
            if i != row:
                T[i] -= T[i, entering] * T[row]
        basis[row] = entering
    x = np.zeros(n + m)
    for i, j in enumerate(basis):
        x[j] = T[i, -1]
    return x[:n]


def route(rates: np.ndarray, counts: np.ndarray, shares: np.ndarray) -> tuple[float, np.ndarray]:
    """rates [G, C] tokens/s per GPU (0: cannot serve), counts [G], shares [C] (sum 1) ->
    (λ tokens/s of the mix the fleet serves, served [G, C] tokens/s each GPU type gives each class, at λ)."""
    G, C = rates.shape
    supply = rates * counts[:, None]  # [G, C] tokens/s if the whole type served that class
    scale = supply.max() or 1.0
    n = G * C + 1  # x[g, c] flattened, then λ
    cost = np.zeros(n)
    cost[-1] = 1.0
    rows, rhs = [], []
    for g in range(G):  # Σ_c x[g,c] ≤ 1
        r = np.zeros(n)
        r[g * C:(g + 1) * C] = 1.0
        rows.append(r)
        rhs.append(1.0)
    for c in range(C):  # λ·s_c − Σ_g supply[g,c]·x[g,c] ≤ 0   (λ in units of `scale`)
        r = np.zeros(n)
        r[-1] = shares[c]
        for g in range(G):
            r[g * C + c] = -supply[g, c] / scale
        rows.append(r)
        rhs.append(0.0)
    x = simplex_max(cost, np.array(rows), np.array(rhs))
    lam = x[-1] * scale
    served = supply * x[:-1].reshape(G, C)
    # A class given more than its share of λ counts only its share: the surplus is idle for this mix.
    got = served.sum(axis=0)
    keep = np.divide(lam * shares, got, out=np.zeros(C), where=got > EPS)
    return float(lam), served * np.minimum(keep, 1.0)[None, :]
