"""Choosing and checking the refusal direction (Arditi et al. 2024), batched with per-row hooks.

Candidates are the residual-stream (``resid_pre``) difference-of-means directions ``r`` at each
candidate layer ``l`` and post-instruction position ``p``; ``r̂ = r / ||r||``. For each candidate:

(a) ``ablate`` — mean refusal score of the harmful prompts with ``r̂`` *directionally ablated*
    (``x <- x - (x·r̂) r̂``) from every layer's ``resid_pre``, ``attn_out`` and ``mlp_out`` at every
    position; lower = removing it breaks refusal more;
(b) ``steer`` — mean refusal score of the harmless prompts with ``r`` (unnormalised) *added* to its own
    layer's ``resid_pre`` at the **post-instruction positions only** (run with a shared prefix cache);
(c) ``kl`` — mean ``KL(p_clean || p_ablated)`` of the next-token distribution at the last prompt
    position of the harmless prompts under the ablation of (a).

Filter: discard when ``kl > kl_max`` (0.1), when ``l >= max_layer_frac · n_layers`` (the last 20% of
layers), when ``steer <= 0`` (adding it does not make refusal more likely than not), or when ``r`` is
zero (classes identical). Choose the remaining candidate with the lowest ``ablate``. With
``prefilter=True`` (a) and (c) are only computed for candidates that pass the cheap filters (layer,
zero direction, (b)); the trace says which were skipped and why.

Causal check (:func:`direction_causal_check`): greedy generation judged by
:class:`kvgeom.judges.KeywordJudge`: the ablation (all layers and positions, generated tokens included)
should lower the harmful refusal rate, the addition (its layer, post-instruction and generated
positions) should raise the harmless refusal rate. Rates with Wilson intervals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from kvgeom.geometry.directions import RefusalDirections
from kvgeom.noise import run_rows
from kvgeom.runtime.forward import encode
from kvgeom.runtime.hooks import HookFn, kv_hooks
from kvgeom.sites import hook_name
from kvgeom.stats import RateCI, rate_ci

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = [
    "CausalCheck",
    "SelectionTrace",
    "ablation_hooks",
    "addition_hooks",
    "direction_causal_check",
    "select_direction",
]

ABLATE_SITES = ("resid_pre", "attn_out", "mlp_out")


def _ablate(x: Tensor, r: Tensor) -> Tensor:
    """``x - (x·r̂) r̂`` per row: ``x [b, pos, d]``, ``r [b, d]`` unit."""
    r = r.to(x.device, x.dtype)
    if r.shape[0] == 1 and x.shape[0] > 1:
        r = r.expand(x.shape[0], -1)
    coef = torch.einsum("bpd,bd->bp", x, r)
    return x - coef[..., None] * r[:, None, :]


def ablation_hooks(model: KVModel, units: Float[Tensor, "rows d"]) -> dict[str, HookFn]:
    """Hooks ablating row ``i``'s unit direction ``units[i]`` from every layer's resid_pre, attn_out and
    mlp_out (rows with a zero vector are untouched)."""
    def fn(x: Tensor, ctx: Any) -> Tensor:
        return _ablate(x, units)

    return {hook_name(s, la): fn for s in ABLATE_SITES for la in range(model.n_layers)}


def addition_hooks(vectors: Float[Tensor, "rows d"], layers: Sequence[int], *, n_post: int | None = None,
                   coeff: float = 1.0) -> dict[str, HookFn]:
    """Hooks adding ``coeff * vectors[i]`` to row ``i``'s ``resid_pre`` at layer ``layers[i]``.

    ``n_post=None``: every position of every call; else the last ``n_post`` positions of a prefill
    (step 0) and every position of later calls (generated tokens).
    """
    lay = torch.as_tensor(list(layers))

    def fn(x: Tensor, ctx: Any) -> Tensor | None:
        if lay.numel() == 1:  # one vector for every row of the batch
            sel = (lay == ctx.layer).expand(x.shape[0])
            vecs = vectors.expand(x.shape[0], -1)
        else:
            sel, vecs = lay == ctx.layer, vectors
        if not bool(sel.any()):
            return None
        y = x.clone()
        v = (coeff * vecs[sel]).to(x.device, x.dtype)[:, None, :]
        idx = sel.nonzero()[:, 0].to(x.device)
        if n_post is not None and ctx.call.step == 0:
            y[idx, -n_post:] = x[idx, -n_post:] + v
        else:
            y[idx] = x[idx] + v
        return y

    return {hook_name("resid_pre", la): fn for la in sorted(set(lay.tolist()))}


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@dataclass(frozen=True)
class SelectionTrace:
    """Everything the selection computed: ``candidates`` (one row per candidate: layer, position, token,
    norm, ablate, steer, kl, kept, reason), the baselines, settings, and the chosen direction."""

    candidates: pd.DataFrame = field(repr=False)
    chosen: tuple[int, int] | None
    direction: Float[Tensor, " d"] | None = field(repr=False)
    baseline: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.candidates.copy()

    def chosen_row(self) -> dict:
        if self.chosen is None:
            return {}
        c = self.candidates
        row = c[(c["layer"] == self.chosen[0]) & (c["position"] == self.chosen[1])].iloc[0]
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}

    def to_json(self, path: str | Path | None = None) -> str:
        """The whole trace as JSON (NaN written as null); also written to ``path`` when given."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and math.isnan(v):
                return None
            return v.item() if hasattr(v, "item") else v

        doc = {"chosen": None if self.chosen is None else {"layer": self.chosen[0], "position": self.chosen[1],
                                                            **{k: clean(v) for k, v in self.chosen_row().items()}},
               "baseline": self.baseline, "settings": self.settings,
               "candidates": [{k: clean(v) for k, v in r.items()} for r in self.candidates.to_dict("records")],
               "direction": None if self.direction is None else self.direction.tolist()}
        text = json.dumps(doc, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> SelectionTrace:
        doc = json.loads(Path(path).read_text())
        ch = doc["chosen"]
        return cls(pd.DataFrame(doc["candidates"]).fillna(np.nan),
                   None if ch is None else (int(ch["layer"]), int(ch["position"])),
                   None if doc["direction"] is None else torch.tensor(doc["direction"], dtype=torch.float64),
                   doc["baseline"], doc["settings"])

    def figure(self) -> Any:
        """Plotly: (a) ablate / (b) steer / (c) KL per candidate over layers, one trace per position; kept
        candidates filled, rejected hollow, the chosen one starred."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        c = self.candidates
        fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                            subplot_titles=("(a) harmful refusal score, direction ablated (lower = better)",
                                            "(b) harmless refusal score, direction added",
                                            "(c) KL(clean || ablated) on harmless"))
        for pi, (pos, g) in enumerate(c.groupby("position")):
            for row, col in ((1, "ablate"), (2, "steer"), (3, "kl")):
                fig.add_trace(go.Scatter(
                    x=g["layer"], y=g[col], mode="markers+lines", name=f"pos {pos} {g['token'].iloc[0]!r}",
                    legendgroup=str(pos), showlegend=row == 1, line={"width": 1},
                    marker={"symbol": ["circle" if k else "circle-open" for k in g["kept"]], "size": 8},
                    hovertext=[f"L{la} pos {pos}: {col} = {v:.3f}<br>{r}" if v == v else
                               f"L{la} pos {pos}: {col} not computed<br>{r}"
                               for la, v, r in zip(g["layer"], g[col], g["reason"], strict=True)],
                    hoverinfo="text", marker_color=pi))
        fig.add_hline(y=self.settings.get("kl_max", 0.1), row=3, col=1, line_dash="dot")
        fig.add_hline(y=self.settings.get("steer_min", 0.0), row=2, col=1, line_dash="dot")
        if self.chosen is not None:
            r = self.chosen_row()
            fig.add_trace(go.Scatter(x=[r["layer"]], y=[r["ablate"]], mode="markers", name="chosen",
                                     marker={"symbol": "star", "size": 16, "color": "black"}), row=1, col=1)
        fig.update_layout(title="Refusal-direction selection (Arditi et al.)", height=800)
        fig.update_xaxes(title_text="layer", row=3, col=1)
        return fig


@torch.inference_mode()
def select_direction(
    model: KVModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    directions: RefusalDirections,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
    prefilter: bool = True,
    steer_min: float | str = 0.0,
    chunk: int = 32,
    progress: bool = False,
) -> SelectionTrace:
    """Score the (layer, position) candidates of ``directions`` (site ``resid_pre``) by (a), (b), (c) and
    choose one (module doc). All candidates × prompts are rows of batched passes.

    ``steer_min``: the (b) filter keeps ``steer > steer_min``; 0.0 is Arditi's rule; ``"harmful"`` /
    ``"harmless"`` use the clean harmful / harmless mean score instead (``"harmless"``: adding the
    direction must raise the harmless refusal score at all), for models whose refusal score is negative
    even on harmful prompts, where no addition reaches 0.
    """
    from kvgeom.evaluate import RefusalScore

    if directions.site != "resid_pre":
        raise ValueError(f"selection scores residual-stream directions (site 'resid_pre'), got {directions.site!r}")
    layers = list(directions.layers if layers is None else layers)
    positions = list(directions.positions if positions is None else positions)
    rs = RefusalScore.for_model(model)
    bh, bb = encode(model, list(harmful)), encode(model, list(harmless))
    nh, nb = len(bh), len(bb)
    n_post = bb.n_post[0]
    cands = [(la, p) for la in layers for p in positions]
    vec = torch.stack([directions.direction(la, p) for la, p in cands]).float()
    norms = vec.norm(dim=-1)
    unit = torch.where(norms[:, None] > 0, vec / norms.clamp_min(1e-30)[:, None], torch.zeros_like(vec))
    defined = [bool(directions.defined[directions.index(la, p)]) for la, p in cands]
    clean_h = run_rows(model, bh, range(nh), lambda r: {}, chunk=chunk)
    clean_b = run_rows(model, bb, range(nb), lambda r: {}, chunk=chunk)
    base = {"harmful_score": float(rs.from_logits(clean_h).mean()),
            "harmless_score": float(rs.from_logits(clean_b).mean())}
    # (b) steering on harmless prompts, post-instruction positions, shared prefix cache
    row_c = np.repeat(np.arange(len(cands)), nb)
    row_p = np.tile(np.arange(nb), len(cands))
    lay_rows = [cands[c][0] for c in row_c]
    steer_logits = run_rows(model, bb, row_p, lambda r: addition_hooks(vec[row_c[r.numpy()]], [lay_rows[i] for i in r],
                                                                       n_post=n_post),
                            where="post", chunk=chunk, progress=progress)
    steer = rs.from_logits(steer_logits).reshape(len(cands), nb).mean(1).numpy()
    limit = max_layer_frac * model.n_layers
    if steer_min in ("harmful", "harmless"):
        smin = base[f"{steer_min}_score"]
    else:
        smin = float(steer_min)
    reasons, evaluate = [], []
    for i, (la, _p) in enumerate(cands):
        why = []
        if not defined[i]:
            why.append("zero direction (classes identical)")
        if la >= limit:
            why.append(f"layer >= {max_layer_frac:.0%} of {model.n_layers}")
        if not steer[i] > smin:
            why.append(f"steer <= {smin:.3g}")
        reasons.append(why)
        evaluate.append(defined[i] and (not prefilter or not why))
    ev = [i for i, ok in enumerate(evaluate) if ok]
    ablate = np.full(len(cands), np.nan)
    kl = np.full(len(cands), np.nan)
    if ev:
        for batch, n, target in ((bh, nh, "ablate"), (bb, nb, "kl")):
            rc = np.repeat(np.array(ev), n)
            rp = np.tile(np.arange(n), len(ev))
            lo = run_rows(model, batch, rp, lambda r, rc=rc: ablation_hooks(model, unit[rc[r.numpy()]]), chunk=chunk,
                          progress=progress)
            if target == "ablate":
                ablate[ev] = rs.from_logits(lo).reshape(len(ev), n).mean(1).numpy()
            else:
                ref = clean_b[torch.as_tensor(rp)]
                kl[ev] = _kl(ref, lo).reshape(len(ev), n).mean(1).numpy()
    for i in range(len(cands)):
        if evaluate[i] and kl[i] > kl_max:
            reasons[i].append(f"kl > {kl_max}")
        if not evaluate[i] and not reasons[i]:
            reasons[i].append("not evaluated")
    kept = [evaluate[i] and not reasons[i] for i in range(len(cands))]
    tok = dict(zip(directions.positions, directions.tokens or [""] * len(directions.positions), strict=False))
    frame = pd.DataFrame({
        "layer": [c[0] for c in cands], "position": [c[1] for c in cands],
        "token": [tok.get(c[1], "") for c in cands], "norm": norms.numpy().astype(float),
        "ablate": ablate, "steer": steer.astype(float), "kl": kl, "evaluated": evaluate, "kept": kept,
        "reason": ["; ".join(r) if r else "kept" for r in reasons],
    })
    chosen = None
    direction = None
    if any(kept):
        i = int(np.nanargmin(np.where(kept, ablate, np.nan)))
        chosen = cands[i]
        direction = directions.direction(*chosen)
    settings = {"kl_max": kl_max, "steer_min": smin, "max_layer_frac": max_layer_frac, "prefilter": prefilter,
                "n_harmful": nh,
                "n_harmless": nb, "candidate_layers": layers, "candidate_positions": positions,
                "steer_positions": "post-instruction", "ablation": "all layers: " + ", ".join(ABLATE_SITES),
                "model": getattr(model, "name", None) or str(getattr(model.facts, "name", ""))}
    return SelectionTrace(frame, chosen, direction, base, settings)


@dataclass(frozen=True)
class CausalCheck:
    """Judged refusal rates (Wilson CIs) with and without the direction, and the completions."""

    harmful_clean: RateCI
    harmful_ablated: RateCI
    harmless_clean: RateCI
    harmless_added: RateCI
    completions: pd.DataFrame = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        recs = []
        for name in ("harmful_clean", "harmful_ablated", "harmless_clean", "harmless_added"):
            recs.append({"condition": name, **getattr(self, name).to_dict()})
        return pd.DataFrame(recs)


def direction_causal_check(
    model: KVModel,
    direction: Float[Tensor, " d"],
    layer: int,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    max_new_tokens: int = 16,
    coeff: float = 1.0,
    batch_size: int = 32,
    judge: Any = None,
) -> CausalCheck:
    """Generate (greedy) with and without the direction and judge refusals (module doc)."""
    from kvgeom.judges import Verdict, get_judge
    from kvgeom.runtime.generation import generate

    judge = get_judge(judge)
    r = direction.float()
    unit = r / r.norm()
    n_post = encode(model, [harmless[0]]).n_post[0]
    runs: dict[str, tuple[list[str], dict[str, HookFn]]] = {
        "harmful_clean": (list(harmful), {}),
        "harmful_ablated": (list(harmful), {}),
        "harmless_clean": (list(harmless), {}),
        "harmless_added": (list(harmless), {}),
    }
    recs, rates = [], {}
    for name, (prompts, _) in runs.items():
        if name == "harmful_ablated":
            hooks = ablation_hooks(model, unit[None])
        elif name == "harmless_added":
            hooks = addition_hooks(r[None], [layer], n_post=n_post, coeff=coeff)
        else:
            hooks = {}
        with kv_hooks(model, hooks):
            gen = generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        verdicts = judge.judge(prompts, gen.texts)
        refused = [v == Verdict.REFUSED for v in verdicts]
        rates[name] = rate_ci(sum(refused), len(refused))
        recs += [{"condition": name, "prompt": p, "completion": t, "refused": f}
                 for p, t, f in zip(prompts, gen.texts, refused, strict=True)]
    return CausalCheck(rates["harmful_clean"], rates["harmful_ablated"], rates["harmless_clean"],
                       rates["harmless_added"], pd.DataFrame(recs))
