"""Operating points of a calibrated model: parsing ``--operating-point`` and the false-accept table
written into ``model.json`` (shared by ``calibrate`` and ``recalibrate``)."""

from __future__ import annotations

import numpy as np

from models.calibration import threshold_for_far

__all__ = ["FAR_TABLE_RATES", "parse_operating_point", "far_table"]

FAR_TABLE_RATES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def parse_operating_point(text: str) -> tuple[str, float | None]:
    """``llr:T``, ``far:RATE`` or ``cosine-eer`` -> (kind, value); ValueError naming the option."""
    kind, _, value = text.partition(":")
    try:
        number = float(value) if value else None
    except ValueError:
        number = None
    if text == "cosine-eer":
        return "cosine-eer", None
    if kind == "llr" and number is not None and -50 <= number <= 50:
        return kind, number
    if kind == "far" and number is not None and 0 < number < 1:
        return kind, number
    raise ValueError(f"--operating-point must be llr:THRESHOLD, far:RATE (0 < RATE < 1) or cosine-eer, got {text!r}")


def far_table(llr: np.ndarray, labels: np.ndarray) -> list[list[float]]:
    """[[false-accept rate, the LLR threshold that gives it], ...] for ``FAR_TABLE_RATES`` within the data's reach."""
    n_non = int((~np.asarray(labels, bool)).sum())
    out = []
    for rate in FAR_TABLE_RATES:
        if rate * n_non < 2:  # fewer than two impostors above the threshold: not measured
            continue
        thr, _, _ = threshold_for_far(llr, labels, rate)
        out.append([rate, round(thr, 4)])
    return out
