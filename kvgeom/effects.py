"""Effect sizes that noise cannot drive: a mitigation compared with the uniform scheme on the same refused
prompts, and the rule that keeps a ratio with a noisy denominator out of every headline.

:func:`paired_flips` is a mitigation's headline: among the prompts refused at full precision, the conditional flip
rate under the uniform scheme vs under the mitigation, their paired difference with a bootstrap CI, the exact
McNemar p on the discordant prompts, and the *share of lost refusals recovered* ``1 - flip_mitigated /
flip_uniform``, stated only when the uniform flip's CI excludes 0.

:func:`aggregate_recovery` is the paper's ``(mitigated - uniform) / (full - uniform)`` refusal-rate recovery; it
is defined only when ``|full - uniform|`` reaches ``min_gap``, because flips and reverse flips cancel in the
aggregate rates and a one-prompt denominator turns noise into -700%. :func:`ratio_is_defined` is the same rule for
any ratio a report shows (PCR, causal ratios, rho): its denominator's interval must exclude 0.

Proved by ``tests/test_effects.py`` (a planted zero denominator is undefined with its reason; a planted recovery
gives McNemar p < 0.05 and a share CI inside [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvgeom.stats import BootstrapCI, RateCI, bootstrap_ci, mcnemar_exact, rate_ci

__all__ = ["DEFAULT_MIN_GAP", "PairedFlips", "aggregate_recovery", "paired_flips", "paired_text", "ratio_is_defined"]

#: Default minimum ``|full - uniform|`` refusal-rate gap for the aggregate recovery to be defined (10 points).
DEFAULT_MIN_GAP = 0.10


def ratio_is_defined(denominator_low: float | None, denominator_high: float | None = None) -> bool:
    """True when a ratio's denominator is distinguishable from 0: its interval ``[low, high]`` excludes 0."""
    if denominator_low is None or (isinstance(denominator_low, float) and math.isnan(denominator_low)):
        return False
    if denominator_high is None:
        return denominator_low > 0
    return denominator_low > 0 or denominator_high < 0


def _flags(x: Sequence[bool] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of per-prompt booleans, got shape {a.shape}")
    return a.astype(bool)


@dataclass(frozen=True)
class PairedFlips:
    """A mitigation against the uniform scheme on the same refused prompts (see :func:`paired_flips`).

    ``recovered`` = prompts the uniform scheme flips and the mitigation keeps refused; ``broken`` = the reverse;
    ``reduction`` = ``flip_uniform - flip_mitigated`` with a paired bootstrap CI; ``share_recovered`` is ``None``
    (with ``share_reason``) when the uniform flip's CI includes 0.
    """

    n_refused: int
    flip_uniform: RateCI
    flip_mitigated: RateCI
    recovered: int
    broken: int
    mcnemar_p: float
    reduction: BootstrapCI
    share_recovered: BootstrapCI | None
    share_reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"n_refused": self.n_refused, "flip_uniform": self.flip_uniform.to_dict(),
                "flip_mitigated": self.flip_mitigated.to_dict(), "recovered": self.recovered, "broken": self.broken,
                "mcnemar_p": self.mcnemar_p, "reduction": self.reduction.to_dict(),
                "share_recovered": self.share_recovered.to_dict() if self.share_recovered else None,
                "share_reason": self.share_reason}


def paired_flips(
    full_refused: Sequence[bool] | np.ndarray,
    uniform_refused: Sequence[bool] | np.ndarray,
    mitigated_refused: Sequence[bool] | np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedFlips:
    """The paired flip comparison from per-prompt ``refused`` flags on the same prompts, in the same order (all
    prompts; only those refused at full precision enter). Resamples draw refused prompts with replacement."""
    f, u, m = (_flags(x, w) for x, w in ((full_refused, "full_refused"), (uniform_refused, "uniform_refused"),
                                         (mitigated_refused, "mitigated_refused")))
    if not f.shape == u.shape == m.shape:
        raise ValueError(f"need three arrays of one length, got {f.size}, {u.size}, {m.size}")
    fu, fm = ~u[f], ~m[f]
    n = int(f.sum())
    flip_u, flip_m = rate_ci(int(fu.sum()), n, confidence=confidence), rate_ci(int(fm.sum()), n,
                                                                               confidence=confidence)
    recovered, broken = int((fu & ~fm).sum()), int((~fu & fm).sum())
    p = mcnemar_exact(recovered, broken)
    if n == 0:
        nan = BootstrapCI(math.nan, math.nan, math.nan, 0, 0, confidence)
        return PairedFlips(0, flip_u, flip_m, 0, 0, p, nan, None,
                           "no prompt was refused at full precision: nothing can be lost or recovered")
    reduction = bootstrap_ci(lambda i: fu[i].mean() - fm[i].mean(), n, n_resamples=n_resamples, seed=seed,
                             confidence=confidence)
    if ratio_is_defined(flip_u.low) and fu.any():
        def share(i: np.ndarray) -> float:
            d = fu[i].mean()
            return math.nan if d == 0 else 1.0 - fm[i].mean() / d

        shr: BootstrapCI | None = bootstrap_ci(share, n, n_resamples=n_resamples, seed=seed, confidence=confidence)
        reason = ""
    else:
        shr, reason = None, (f"the uniform scheme flips {int(fu.sum())}/{n} refused prompts: nothing lost, so no "
                             "share of it can be recovered")
    return PairedFlips(n, flip_u, flip_m, recovered, broken, p, reduction, shr, reason)


def aggregate_recovery(full_rate: float, uniform_rate: float, *, min_gap: float = DEFAULT_MIN_GAP,
                       flips: int | None = None, reverse_flips: int | None = None) -> tuple[bool, str]:
    """Whether ``(mitigated - uniform) / (full - uniform)`` is defined: ``(True, "")`` when ``|full - uniform| >=
    min_gap``, else ``(False, why)``; ``flips`` / ``reverse_flips`` (the uniform scheme's) make the reason say
    whether they cancel."""
    if not 0.0 <= min_gap <= 1.0:
        raise ValueError(f"min_gap is a refusal-rate difference in [0, 1], got {min_gap!r}")
    gap = abs(float(full_rate) - float(uniform_rate))
    if math.isnan(gap):
        return False, "a refusal rate is undefined"
    if gap >= min_gap and gap > 0:
        return True, ""
    why = (f"full and uniform refusal differ by {gap:.0%} (< the {min_gap:.0%} minimum): the ratio's denominator "
           "is within noise")
    if flips and reverse_flips:
        why += f"; flips ({flips}) and reverse flips ({reverse_flips}) cancel in the aggregate rates"
    return False, why


def paired_text(paired: Mapping[str, Any] | None) -> str:
    """:meth:`PairedFlips.to_dict` in words: flips under the mitigation vs the uniform scheme on the same refused
    prompts, McNemar's p and the share of lost refusals recovered (or why that share is undefined)."""
    if not paired or not paired.get("n_refused"):
        return "no refused prompt"
    fu, fm = paired["flip_uniform"], paired["flip_mitigated"]
    txt = f"flips {fm['k']}/{fm['n']} vs {fu['k']}/{fu['n']} uniform (McNemar p={paired['mcnemar_p']:.2g}); "
    shr = paired.get("share_recovered")
    if shr and shr.get("estimate") is not None:
        lo, hi = shr.get("low"), shr.get("high")
        ci = f" [{lo:.0%}, {hi:.0%}]" if lo is not None and hi is not None else ""
        return txt + f"recovers {shr['estimate']:.0%}{ci} of lost refusals"
    return txt + f"share recovered undefined: {paired.get('share_reason')}"
