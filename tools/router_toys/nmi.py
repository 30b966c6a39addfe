"""Normalised mutual information between two labelings (top-1 expert vs true cluster).

``I(A;B) = sum_ab p(a,b) ln(p(a,b) / (p(a) p(b)))`` from the contingency table of the two labelings,
normalised by the arithmetic mean of the entropies (Vinh, Epps & Bailey, JMLR 2010, "NMI_sum"):

    NMI(A, B) = 2 I(A;B) / (H(A) + H(B))

It is 1 when one labeling is a relabeling of the other (an expert per cluster, in any order), 0 when
they are independent. Two constant labelings are identical partitions, so they score 1; a constant
labeling against a non-constant one scores 0 (it carries no information about it).
"""

from __future__ import annotations

import numpy as np


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts ``n[i, j]`` of items with the i-th distinct value of ``a`` and the j-th of ``b``."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape[0]} vs {b.shape[0]}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max(initial=-1) + 1, ib.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    return table


def entropy_nats(counts: np.ndarray) -> float:
    """Shannon entropy ``-sum p ln p`` (nats) of the distribution proportional to ``counts``."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """``I(A;B)`` in nats, from the empirical joint distribution of the two labelings."""
    table = contingency(a, b).astype(np.float64)
    p_ab = table / table.sum()
    p_a, p_b = p_ab.sum(axis=1, keepdims=True), p_ab.sum(axis=0, keepdims=True)
    nz = p_ab > 0
    return float((p_ab[nz] * np.log(p_ab[nz] / (p_a @ p_b)[nz])).sum())


def normalized_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """``2 I(A;B) / (H(A) + H(B))`` in [0, 1] (module docstring); raises on empty input."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size == 0:
        raise ValueError("NMI of empty labelings is undefined")
    table = contingency(a, b)
    h_a, h_b = entropy_nats(table.sum(axis=1)), entropy_nats(table.sum(axis=0))
    if h_a == 0.0 and h_b == 0.0:
        return 1.0
    nmi = 2.0 * mutual_information(a, b) / (h_a + h_b)
    return float(min(max(nmi, 0.0), 1.0))  # clip rounding just outside [0, 1]
