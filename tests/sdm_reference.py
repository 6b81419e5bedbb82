"""Independent references of the SDM metrics (no code shared with botaclip_core.sdm)."""

from __future__ import annotations

import math

from scipy import stats


def ecospat_boyce_reference(fit: list[float], obs: list[float]) -> float:
    """A line-by-line transcription of ``ecospat.boyce`` (ecospat 4.x, nclass = 0, defaults).

    R: ``window.w <- (max(fit) - min(fit))/10``; ``vec.mov <- seq(mini, maxi - window.w,
    by = (maxi - mini - window.w)/res)``; ``vec.mov[res + 1] <- vec.mov[res + 1] + 1``; per
    interval ``round(pi/ei, 10)`` with closed bounds; NaN dropped; successive duplicates removed
    with ``f != c(f[-1], TRUE)``; ``cor(f[r], vec.mov[to.keep][r], method = "spearman")``.
    Plain Python loops, no numpy, so that it shares nothing with the code under test.
    """
    res = 100
    mini, maxi = min(min(fit), min(obs)), max(max(fit), max(obs))
    w = (max(fit) - min(fit)) / 10
    step = (maxi - mini - w) / res
    vec_mov = [mini + i * step for i in range(res + 1)]
    vec_mov[res] += 1
    f, kept = [], []
    for start in vec_mov:
        end = start + w
        pi = sum(1 for o in obs if start <= o <= end) / len(obs)
        ei = sum(1 for v in fit if start <= v <= end) / len(fit)
        if ei == 0:
            if pi == 0:
                continue  # NaN: dropped
            ratio = math.inf
        else:
            ratio = round(pi / ei, 10)
        f.append(ratio)
        kept.append(start)
    if len(f) < 2:
        return math.nan
    nxt = f[1:] + [1.0]
    r = [i for i in range(len(f)) if f[i] != nxt[i]]
    fr, sr = [f[i] for i in r], [kept[i] for i in r]
    if len(fr) < 2 or len(set(fr)) < 2:
        return math.nan
    return float(stats.spearmanr(fr, sr).statistic)
