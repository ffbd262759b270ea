"""Unit conversions used by the physics (dB, dBm); kept in one place so no module re-derives them."""

from __future__ import annotations

import numpy as np


def db_to_linear(db):
    """Power ratio in dB -> linear ratio."""
    return np.power(10.0, np.asarray(db, dtype=np.float64) / 10.0)


def linear_to_db(x, floor: float = 1e-30):
    """Linear power ratio -> dB (values below ``floor`` are clipped so the result stays finite)."""
    return 10.0 * np.log10(np.maximum(np.asarray(x, dtype=np.float64), floor))


def dbm_to_watt(dbm):
    """Power in dBm -> watts."""
    return np.power(10.0, (np.asarray(dbm, dtype=np.float64) - 30.0) / 10.0)


def bessel_j0(x):
    """Bessel function of the first kind, order 0 (Jakes' autocorrelation), by its integral
    J0(x) = (1/pi) * int_0^pi cos(x sin t) dt; Simpson's rule on 2001 nodes is accurate to ~1e-12
    for the |x| < 100 used here. Avoids a SciPy dependency for one function."""
    x = np.asarray(x, dtype=np.float64)
    t = np.linspace(0.0, np.pi, 2001)
    w = np.ones_like(t)
    w[1:-1:2] = 4.0
    w[2:-1:2] = 2.0
    vals = np.cos(np.multiply.outer(x, np.sin(t)))
    return (vals @ w) * (t[1] - t[0]) / 3.0 / np.pi
