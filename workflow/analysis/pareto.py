"""Pareto frontiers on point sets: the best score for a given cost (or accuracy)."""

from __future__ import annotations

import numpy as np


def pareto_front(x: np.ndarray, score: np.ndarray, minimize_x: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    A point is dominated when another point has a score at least as high and an
    ``x`` at least as good (lower when ``minimize_x``, e.g. FLOPs; higher
    otherwise, e.g. ImageNet accuracy), and is strictly better in one of the
    two. Duplicated points do not dominate each other, so both stay on the
    front. Points with a NaN coordinate are never on it.
    """
    x = np.asarray(x, dtype=float)
    s = np.asarray(score, dtype=float)
    if x.shape != s.shape or x.ndim != 1:
        raise ValueError(f"x and score must be 1-d and of one length, got {x.shape} and {s.shape}")
    ok = ~(np.isnan(x) | np.isnan(s))
    cost = x if minimize_x else -x  # to "lower is better"
    # [i, j]: does j dominate i? (n is a few hundred at most: the n x n matrix is fine)
    no_worse = (cost[None, :] <= cost[:, None]) & (s[None, :] >= s[:, None])
    better = (cost[None, :] < cost[:, None]) | (s[None, :] > s[:, None])
    dominated = (no_worse & better & ok[None, :]).any(axis=1)
    return ok & ~dominated


def front_line(x: np.ndarray, score: np.ndarray, minimize_x: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """The frontier's points sorted along ``x``, for drawing it as a step line."""
    mask = pareto_front(x, score, minimize_x)
    xs, ss = np.asarray(x, float)[mask], np.asarray(score, float)[mask]
    order = np.argsort(xs, kind="stable")
    return xs[order], ss[order]
