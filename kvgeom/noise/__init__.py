"""Noise injection into K/V (and the residual stream) with per-row interventions, in batched passes.

The engine (:func:`run_rows`) evaluates many *rows* at once: a row is (prompt, intervention), and a
hook applies each row's intervention to that row only, so a sweep over layers × noise kinds × random
draws is a handful of batched forward passes, never a Python loop of single-prompt forwards.

Two placements (``where``):

* ``"all"`` — the intervention acts on every real position of the prompt (full forward per row);
* ``"post"`` — it acts on the post-instruction template tokens only (the ``n_post`` tokens where the
  refusal decision is read). The clean prefix (system prompt + user text) is run **once** per prompt
  and its KV cache is shared by every row of that prompt; each row then runs only its ``n_post`` tokens
  (about 9x cheaper on the default model). Exact, because an intervention at the post positions
  cannot change the prefix.

Noise kinds at one (layer, K/V site), for a K/V activation ``x`` (one vector per position, heads
concatenated: ``x ∈ R^D``, ``D = n_kv_heads * d_head``) and the real quantization error
``e = fake_quant(x) - x`` of a scheme (ranges measured on the clean prompt, as in forward-mode plans):

==============  =====================================================================================
kind            injected ``x -> x + n``
==============  =====================================================================================
``quant``       ``n = e``                                                     (a: the scheme itself)
``isotropic``   ``n = ||e|| g / ||g||``, ``g ~ N(0, I_D)``                    (b)
``subspace``    ``n = ||e|| P_S g / ||P_S g||``                               (c: confined to S)
``random``      ``n = ||e|| P_R g / ||P_R g||``, ``R`` a random rank-k space  (d: one per draw)
``quant_in``    ``n = P_S e``                                                 (e: error inside S)
``quant_out``   ``n = e - P_S e``                                             (e: error outside S)
``none``        ``n = 0``
==============  =====================================================================================

Norms match **per position vector** (``||n|| = ||e||`` for every prompt position). ``P_S = B Bᵀ`` for an
orthonormal basis ``B ∈ R^{D×k}``; random subspaces are ``R = qr(G)``, ``G ~ N(0, I)^{D×k}``.

Several layers at once: ``NoiseCondition(kind, layers=(4, 10, 16, 22))`` acts on all of them, each layer with
its own noise of its own norm (:mod:`kvgeom.noise.conditions`); :func:`causal_ratio` measures the drops and
``rho_causal`` for such conditions at every prompt position (:mod:`kvgeom.noise.causal`).

Readouts: the refusal score (:class:`kvgeom.evaluate.RefusalScore`) at the last prompt position, and on
text (:func:`text_effects`) the mean next-token NLL and ``KL(p_clean || p_noisy)`` per token.
"""

from .causal import CAUSAL_KINDS, CausalRatio, RatioCI, causal_ratio, ratio_ci
from .conditions import Deltas, NoiseCondition, condition_deltas, delta_hooks, score_conditions
from .rows import capture_padded, last_logits, quant_error, run_rows
from .sweep import NoiseResult, inject_noise, noise_sweep, text_effects
from .vectors import NOISE_KINDS, make_noise, orthonormal, project, random_subspace

__all__ = [
    "CAUSAL_KINDS",
    "NOISE_KINDS",
    "CausalRatio",
    "Deltas",
    "NoiseCondition",
    "NoiseResult",
    "RatioCI",
    "capture_padded",
    "causal_ratio",
    "condition_deltas",
    "delta_hooks",
    "inject_noise",
    "last_logits",
    "make_noise",
    "noise_sweep",
    "orthonormal",
    "project",
    "quant_error",
    "random_subspace",
    "ratio_ci",
    "run_rows",
    "score_conditions",
    "text_effects",
]
