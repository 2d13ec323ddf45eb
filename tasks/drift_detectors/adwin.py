"""ADWIN (ADaptive WINdowing) with the exponential-histogram buckets of ADWIN2.

Reference: A. Bifet, R. Gavaldà, "Learning from Time-Changing Data with Adaptive Windowing", SDM 2007.
The window W is kept as rows of buckets; row ``i`` holds at most ``max_buckets`` summaries of 2**i
consecutive items (their sum and their sum of squared deviations M2). When a row overflows, its two oldest
buckets are merged into one bucket of the next row, so W items need O(max_buckets · log W) memory and an
update costs O(1) amortised plus, every ``clock`` items, one O(log W) scan over the bucket boundaries.

At every boundary the window is split into W0 (older, n0 items) and W1 (newer, n1 items) and a change is
declared when |μ̂0 − μ̂1| > ε_cut, with (Bifet & Gavaldà 2007, §3, Bernstein-type bound, as in river):

    δ' = ln(2 · ln|W| / δ),   1/m = 1/(n0 − L + 1) + 1/(n1 − L + 1)        (L = min_window_length)
    ε_cut = sqrt(2 · (1/m) · σ²_W · δ') + 2/3 · δ' · (1/m)

where σ²_W is the variance of the whole window. On a cut the oldest bucket is dropped and the scan restarts.

Parity with ``river.drift.ADWIN`` (river 0.26, Rust helper ``rust_src/adwin.rs``): the arithmetic below
repeats river's operation order (Welford-style insert, bucket merge, delete, ε_cut) so the float results, and
therefore the detection points, are bit-identical; tests/test_drift_detectors.py checks this on seeded
streams. With ``reset_on_drift=True`` (default, river's ``ADWIN`` wrapper) the whole state is cleared on the
update after a detection; with ``False`` the detector keeps W1 and continues (the paper's ADWIN, river's raw
``AdaptiveWindowing`` helper).

Two paths with the same results: :meth:`ADWIN.update` is compact pure Python (lists of floats);
:meth:`ADWIN.update_many` runs a numba-compiled kernel over a NumPy array when numba is importable (an
optional dependency), else it loops over :meth:`ADWIN.update`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

_isfinite = math.isfinite  # bound once: update() is the hot path

# Rows of buckets the array kernel can hold: row i has buckets of 2**i items, so 63 rows cover any stream.
_MAX_ROWS = 63


class ADWIN:
    """Adaptive-window change detector on a stream of real values (e.g. a 0/1 error stream).

    Args:
        delta: confidence δ of the cut test, in (0, 1); smaller → fewer false alarms, longer delays.
        clock: check for a change every ``clock`` updates (river's default 32).
        max_buckets: buckets per row before two are merged (ADWIN2's M; river uses 5).
        min_window_length: neither sub-window may be shorter than this at a cut point.
        grace_period: no check until the window holds more than this many items.
        reset_on_drift: clear the whole window on the update after a detection (river's ``ADWIN``);
            ``False`` keeps the post-change part W1 (the paper's behaviour).
    """

    __slots__ = (
        "_drift_detected",
        "_n_detections",
        "_tick",
        "_total",
        "_totals",
        "_variance",
        "_variances",
        "_width",
        "clock",
        "delta",
        "grace_period",
        "max_buckets",
        "min_window_length",
        "reset_on_drift",
    )

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
        reset_on_drift: bool = True,
    ) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if clock < 1:
            raise ValueError(f"clock must be >= 1, got {clock!r}")
        if max_buckets < 2:
            raise ValueError(f"max_buckets must be >= 2, got {max_buckets!r}")
        if min_window_length < 1:
            raise ValueError(f"min_window_length must be >= 1, got {min_window_length!r}")
        if grace_period < 0:
            raise ValueError(f"grace_period must be >= 0, got {grace_period!r}")
        self.delta = float(delta)
        self.clock = int(clock)
        self.max_buckets = int(max_buckets)
        self.min_window_length = int(min_window_length)
        self.grace_period = int(grace_period)
        self.reset_on_drift = bool(reset_on_drift)
        self._n_detections = 0
        self._drift_detected = False
        self._clear()

    def _clear(self) -> None:
        """Empty window (river replaces its helper: tick, sums and buckets start again from zero)."""
        self._totals: list[list[float]] = [[]]  # row i: bucket sums of 2**i items, oldest first
        # row i: bucket M2 (sum of squared deviations). Row 0 stays empty: a single item has M2 = 0, and
        # 0.0 + 0.0 + x == x and x − 0.0 == x exactly, so leaving those zeros out changes no result.
        self._variances: list[list[float]] = [[]]
        self._total = 0.0
        self._variance = 0.0  # M2 of the whole window
        self._width = 0.0  # float, as in river, so the arithmetic below is identical
        self._tick = 0

    # ----------------------------------------------------------------- public API
    @property
    def width(self) -> int:
        """Number of items in the current window |W|."""
        return int(self._width)

    @property
    def estimation(self) -> float:
        """Mean of the window μ̂_W (0.0 when empty)."""
        return self._total / self._width if self._width else 0.0

    @property
    def variance(self) -> float:
        """Population variance σ²_W of the window (river's ``variance`` property is the M2 sum instead)."""
        return self._variance / self._width if self._width else 0.0

    @property
    def n_detections(self) -> int:
        """Detections since construction (river's counter restarts at each reset; this one does not)."""
        return self._n_detections

    @property
    def drift_detected(self) -> bool:
        """Whether the last update detected a change."""
        return self._drift_detected

    def update(self, x: float) -> bool:
        """Add one value; return True when a change is detected at this update."""
        if self._drift_detected:
            self._drift_detected = False
            if self.reset_on_drift:
                self._clear()
        value = float(x)
        if not _isfinite(value):  # one NaN/inf would poison the sums and silence the detector for good
            raise ValueError(f"x must be finite, got {x!r}")
        row0 = self._totals[0]
        row0.append(value)
        # Welford-style M2 update, river's operation order: M2 += (w−1)·(x − μ_{w−1})² / w.
        width = self._width + 1.0
        if width > 1.0:
            d = value - self._total / (width - 1.0)
            self._variance += (width - 1.0) * d * d / width
        self._width = width
        self._total += value
        if len(row0) > self.max_buckets:
            self._compress()
        self._tick += 1
        if self._tick % self.clock or width <= self.grace_period:
            return False
        if self._detect_change():
            self._n_detections += 1
            self._drift_detected = True
            return True
        return False

    def update_many(self, values: np.ndarray, *, fast: bool | None = None) -> np.ndarray:
        """Feed a batch; return the (0-based, within ``values``) indices where a change was detected.

        Same results as calling :meth:`update` on each value. ``fast=None`` uses the compiled kernel when
        numba is installed; ``True`` requires it (ImportError otherwise); ``False`` forces pure Python.
        """
        data = np.ascontiguousarray(values, dtype=np.float64)
        if data.ndim != 1:
            raise ValueError(f"values must be one-dimensional, got shape {data.shape}")
        if not np.isfinite(data).all():
            raise ValueError("values must be finite (found NaN or inf)")
        kernel = _compiled_kernel() if fast is not False else None
        if fast and kernel is None:
            raise ImportError("update_many(fast=True) needs numba, which is not installed")
        if kernel is None:
            return np.flatnonzero(np.fromiter((self.update(v) for v in data.tolist()), bool, len(data)))
        return self._run_kernel(kernel, data)

    # ----------------------------------------------------------------- internals
    def _compress(self) -> None:
        """Merge the two oldest buckets of each full row into the next row (cascading)."""
        totals, variances, cap = self._totals, self._variances, self.max_buckets
        idx = 0
        while len(totals[idx]) == cap + 1:
            row_t, row_v = totals[idx], variances[idx]
            n = float(1 << idx)
            mu1, mu2 = row_t[0] / n, row_t[1] / n
            # Chan et al. pairwise M2 merge for equal sizes n: M2 = M2a + M2b + n/2 · (μa − μb)².
            merged_var = n * 0.5 * (mu1 - mu2) * (mu1 - mu2)
            if idx:  # row 0's M2 are implicit zeros
                merged_var = row_v[0] + row_v[1] + merged_var
                del row_v[:2]
            if idx + 1 == len(totals):
                totals.append([])
                variances.append([])
            totals[idx + 1].append(row_t[0] + row_t[1])
            variances[idx + 1].append(merged_var)
            del row_t[:2]
            idx += 1

    def _delete_oldest(self) -> None:
        """Drop the oldest bucket (first of the last row) and downdate total and M2."""
        last = len(self._totals) - 1
        n = float(1 << last)
        u = self._totals[last][0]
        v = self._variances[last][0] if last else 0.0
        mu = u / n
        self._width -= n
        self._total -= u
        mu_window = self._total / self._width
        self._variance -= v + n * self._width * (mu - mu_window) * (mu - mu_window) / (n + self._width)
        del self._totals[last][0]
        if last:
            del self._variances[last][0]
        if not self._totals[last]:
            self._totals.pop()
            self._variances.pop()

    def _detect_change(self) -> bool:
        """Scan every bucket boundary (oldest first); on a cut drop the oldest bucket and rescan."""
        detected = False
        min_len = float(self.min_window_length)
        while self._width >= 2.0:
            width = self._width
            # Constant over one scan; river recomputes them per boundary with the same operands.
            delta_prime = math.log(2.0 * math.log(width) / self.delta)
            linear = 2.0 / 3.0 * delta_prime  # river's 2/3·δ'·(1/m), evaluated left to right
            var_w = self._variance / width
            n0, n1, u0, u1 = 0.0, width, 0.0, self._total
            cut = False
            rows = self._totals
            for idx in range(len(rows) - 1, -1, -1):
                size = float(1 << idx)
                # W1 always keeps the newest item, so the last boundary of row 0 is never a cut point.
                for t in rows[idx] if idx else rows[0][:-1]:
                    n0 += size
                    n1 -= size
                    u0 += t
                    u1 -= t
                    if n1 < min_len or n0 < min_len:
                        continue
                    # n0, n1, L are integers < 2**53, so these sums are exact in any order.
                    m_recip = 1.0 / (n0 - min_len + 1.0) + 1.0 / (n1 - min_len + 1.0)
                    arg = 2.0 * m_recip * var_w * delta_prime
                    if arg < 0.0:  # rounding made M2 < 0: river's sqrt gives NaN, i.e. no cut
                        continue
                    if abs(u0 / n0 - u1 / n1) > math.sqrt(arg) + linear * m_recip:
                        cut = True
                        break
                if cut:
                    break
            if not cut:
                break
            detected = True
            self._delete_oldest()
        return detected

    def _run_kernel(self, kernel: Callable[..., int], data: np.ndarray) -> np.ndarray:
        """Copy the bucket lists into arrays, run the compiled kernel, copy the state back."""
        cols = self.max_buckets + 1
        tot = np.zeros((_MAX_ROWS, cols))
        var = np.zeros((_MAX_ROWS, cols))
        cnt = np.zeros(_MAX_ROWS, dtype=np.int64)
        for i, (row_t, row_v) in enumerate(zip(self._totals, self._variances, strict=True)):
            cnt[i] = len(row_t)
            tot[i, : len(row_t)] = row_t
            var[i, : len(row_v)] = row_v  # row 0: implicit zeros (np.zeros)
        fstate = np.array([self._total, self._variance, self._width])
        istate = np.array(
            [len(self._totals), self._tick, self._n_detections, int(self._drift_detected)], dtype=np.int64
        )
        fparams = np.array([self.delta, float(self.min_window_length), float(self.grace_period)])
        iparams = np.array([self.clock, self.max_buckets, int(self.reset_on_drift)], dtype=np.int64)
        out = np.empty(len(data) // self.clock + 2, dtype=np.int64)  # ≤ one detection per clock tick
        n_out = kernel(data, tot, var, cnt, fstate, istate, fparams, iparams, out)
        n_rows = int(istate[0])
        self._totals = [tot[i, : cnt[i]].tolist() for i in range(n_rows)]
        self._variances = [[]] + [var[i, : cnt[i]].tolist() for i in range(1, n_rows)]
        self._total, self._variance, self._width = (float(v) for v in fstate)
        self._tick, self._n_detections = int(istate[1]), int(istate[2])
        self._drift_detected = bool(istate[3])
        return out[:n_out].copy()


def fast_path_available() -> bool:
    """True when numba is importable, so :meth:`ADWIN.update_many` runs compiled."""
    return _compiled_kernel() is not None


@functools.cache
def _compiled_kernel() -> Callable[..., int] | None:
    """numba-compile :func:`_adwin_kernel` once (cached on disk); None when numba is missing."""
    try:
        import numba
    except ImportError:
        return None
    compiled: Callable[..., int] = numba.njit(cache=True, nogil=True)(_adwin_kernel)
    return compiled


def _adwin_kernel(
    values: Any,
    tot: Any,
    var: Any,
    cnt: Any,
    fstate: Any,
    istate: Any,
    fparams: Any,
    iparams: Any,
    out: Any,
) -> int:  # pragma: no cover - runs compiled by numba; equality with ADWIN.update is tested
    """Array version of ADWIN.update (same operation order), for numba. Returns detections written to out.

    State layout: fstate = [total, M2, width]; istate = [n_rows, tick, n_detections, drift_pending];
    fparams = [delta, min_window_length, grace_period]; iparams = [clock, max_buckets, reset_on_drift].
    """
    total, m2, width = fstate[0], fstate[1], fstate[2]
    n_rows, tick, n_det, pending = istate[0], istate[1], istate[2], istate[3]
    delta, min_len, grace = fparams[0], fparams[1], fparams[2]
    clock, cap, reset = iparams[0], iparams[1], iparams[2]
    n_out = 0
    for i in range(values.shape[0]):
        if pending:
            pending = 0
            if reset:
                for r in range(n_rows):
                    cnt[r] = 0
                n_rows = 1
                total = 0.0
                m2 = 0.0
                width = 0.0
                tick = 0
        value = values[i]
        # insert
        tot[0, cnt[0]] = value
        var[0, cnt[0]] = 0.0
        cnt[0] += 1
        width += 1.0
        if width > 1.0:
            d = value - total / (width - 1.0)
            m2 += (width - 1.0) * d * d / width
        total += value
        # compress
        idx = 0
        while cnt[idx] == cap + 1:
            n = float(1 << idx)
            mu1 = tot[idx, 0] / n
            mu2 = tot[idx, 1] / n
            merged_var = var[idx, 0] + var[idx, 1] + n * 0.5 * (mu1 - mu2) * (mu1 - mu2)
            if idx + 1 == n_rows:
                cnt[n_rows] = 0
                n_rows += 1
            j = cnt[idx + 1]
            tot[idx + 1, j] = tot[idx, 0] + tot[idx, 1]
            var[idx + 1, j] = merged_var
            cnt[idx + 1] = j + 1
            for k in range(cnt[idx] - 2):
                tot[idx, k] = tot[idx, k + 2]
                var[idx, k] = var[idx, k + 2]
            cnt[idx] -= 2
            idx += 1
        # detect
        tick += 1
        if tick % clock != 0 or width <= grace:
            continue
        detected = False
        while width >= 2.0:
            delta_prime = np.log(2.0 * np.log(width) / delta)
            var_w = m2 / width
            n0 = 0.0
            n1 = width
            u0 = 0.0
            u1 = total
            cut = False
            for r in range(n_rows - 1, -1, -1):
                size = float(1 << r)
                stop = cnt[r] - 1 if r == 0 else cnt[r]
                for k in range(stop):
                    n0 += size
                    n1 -= size
                    u0 += tot[r, k]
                    u1 -= tot[r, k]
                    if n1 < min_len or n0 < min_len:
                        continue
                    m_recip = 1.0 / (n0 - min_len + 1.0) + 1.0 / (n1 - min_len + 1.0)
                    arg = 2.0 * m_recip * var_w * delta_prime
                    if arg < 0.0:
                        continue
                    if abs(u0 / n0 - u1 / n1) > np.sqrt(arg) + 2.0 / 3.0 * delta_prime * m_recip:
                        cut = True
                        break
                if cut:
                    break
            if not cut:
                break
            detected = True
            # delete the oldest bucket
            last = n_rows - 1
            n = float(1 << last)
            u = tot[last, 0]
            v = var[last, 0]
            mu = u / n
            width -= n
            total -= u
            mu_window = total / width
            m2 -= v + n * width * (mu - mu_window) * (mu - mu_window) / (n + width)
            for k in range(cnt[last] - 1):
                tot[last, k] = tot[last, k + 1]
                var[last, k] = var[last, k + 1]
            cnt[last] -= 1
            if cnt[last] == 0:
                n_rows -= 1
        if detected:
            n_det += 1
            pending = 1
            out[n_out] = i
            n_out += 1
    fstate[0], fstate[1], fstate[2] = total, m2, width
    istate[0], istate[1], istate[2], istate[3] = n_rows, tick, n_det, pending
    return n_out
