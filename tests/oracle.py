"""An independent float64 implementation of Algorithm 1 (NumPy), written from the paper.

It shares no code with the package: the tests compare the reference backend against it, and
every other backend against the reference.
"""

from __future__ import annotations

import numpy as np


def normalize_rows(w: np.ndarray) -> np.ndarray:
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).reshape(w.shape)


class VectorOracle:
    """θ^v of Algorithm 1 for one tensor; rows of ``w.reshape(rows, -1)`` are the vectors."""

    def __init__(self, w0: np.ndarray, beta1: float, beta2: float, eps: float, normalize: bool = True):
        self.shape = w0.shape
        rows = w0.shape[0]
        self.w = (normalize_rows(w0) if normalize else w0.astype(np.float64)).reshape(rows, -1)
        self.m = np.zeros_like(self.w)
        self.v = np.zeros(rows)
        self.t = 0
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def step(self, grad: np.ndarray, lr: float, weight_decay: float = 0.0) -> None:
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        g_bar = grad.astype(np.float64).reshape(self.w.shape) + weight_decay * self.w
        radial = np.einsum("ij,ij->i", g_bar, self.w)
        g = g_bar - radial[:, None] * self.w
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * np.einsum("ij,ij->i", g, g)
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        w_bar = self.w - lr * m_hat / (np.sqrt(v_hat) + self.eps)[:, None]
        self.w = w_bar / np.linalg.norm(w_bar, axis=1, keepdims=True)

    @property
    def param(self) -> np.ndarray:
        return self.w.reshape(self.shape)

    @property
    def exp_avg(self) -> np.ndarray:
        return self.m.reshape(self.shape)


class ScalarOracle:
    """θ^s of Algorithm 1: Adam with L2 weight decay, ε added after bias correction."""

    def __init__(self, p0: np.ndarray, beta1: float, beta2: float, eps: float):
        self.p = p0.astype(np.float64).copy()
        self.m = np.zeros_like(self.p)
        self.v = np.zeros_like(self.p)
        self.t = 0
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def step(self, grad: np.ndarray, lr: float, weight_decay: float = 0.0) -> None:
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        g = grad.astype(np.float64) + weight_decay * self.p
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        self.p = self.p - lr * m_hat / (np.sqrt(v_hat) + self.eps)

    @property
    def param(self) -> np.ndarray:
        return self.p

    @property
    def exp_avg(self) -> np.ndarray:
        return self.m
