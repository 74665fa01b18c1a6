"""Hugging Face transformers ``QuantizedCache`` (``cache_implementation="quantized"``).

Read in transformers 5.23.0 ``src/transformers/cache_utils.py`` (``QuantizedLayer``, ``QuantoQuantizedLayer``,
``HQQQuantizedLayer``, ``Fp8QuantizedLayer``, ``QuantizedCache``: backends quanto (nbits 2/4, axis 0 or -1),
hqq (nbits 1/2/3/4/8), fp8 (per-tensor e4m3); ``q_group_size`` 64 and ``residual_length`` 128 by default) and
optimum-quanto 0.2.7 (:mod:`kvgeom.quant.formats.hf_quanto`). A per-layer exception is a hand-built
``Cache(layers=[...])`` passed as ``past_key_values``. Proved by ``tests/engines/test_engines.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvgeom.quant import Scheme

from .base import Engine, EngineFormat, FixCandidate, ModelShape, Unsimulated, register_engine

__all__ = ["HF"]


class HF(Engine):
    name = "hf"
    title = "HF transformers"
    source = ("huggingface/transformers 5.23.0: src/transformers/cache_utils.py (QuantizedLayer, QuantoQuantizedLayer,"
              " HQQQuantizedLayer, Fp8QuantizedLayer, QuantizedCache); optimum-quanto 0.2.7 (MaxOptimizer, "
              "quantize_affine)")
    fix_kind = "per-layer cache (full-precision layers)"

    def formats(self, shape: ModelShape) -> list[EngineFormat]:
        group = next((g for g in (64, 32, 16) if shape.d_head % g == 0), None)
        if group is None:
            return []
        out = []
        for bits in (4, 2):
            cfg = {"backend": "quanto", "nbits": bits, "q_group_size": group, "residual_length": 128}
            out.append(EngineFormat(f"quanto {bits}-bit", f"quanto{bits}-g{group}-r128", repr(cfg), prefill="full",
                                    note="the prompt is quantized once the call ends; the newest < 128 generated "
                                         "tokens stay full precision"))
        return out

    def unsimulated(self) -> tuple[Unsimulated, ...]:
        return (Unsimulated("hqq", "not simulated: HQQ's half-quadratic optimizer (the hqq package) is not "
                                   "transcribed in kvgeom"),
                Unsimulated("fp8", "not simulated: one e4m3 scale for the whole padded batch (batch-dependent) and no "
                                   "saturation of later tokens"))

    def command(self, fmt: EngineFormat, model: str) -> str:
        return (f'model = AutoModelForCausalLM.from_pretrained("{model}")\n'
                f'model.generate(**inputs, cache_implementation="quantized", cache_config={fmt.setting})')

    def fix_candidates(self, fmt: EngineFormat, shape: ModelShape, *, layer_order: Sequence[int],
                       budget_bits: float, max_candidates: int, model: str) -> list[FixCandidate]:
        spec = Scheme.parse(fmt.scheme).k
        cfg = spec.hf().config or {}
        kw = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "backend")
        out = []
        for size in range(1, min(max_candidates, shape.n_layers - 1) + 1):
            keep = sorted(layer_order[:size])
            a = tuple(None if i in keep else fmt.scheme for i in range(shape.n_layers))
            code = ("from transformers.cache_utils import Cache, DynamicLayer, QuantoQuantizedLayer\n"
                    f"keep = {set(keep)!r}\n"
                    f"cache = Cache(layers=[DynamicLayer() if i in keep else QuantoQuantizedLayer({kw}) "
                    f"for i in range({shape.n_layers})])\n"
                    "model.generate(**inputs, past_key_values=cache)")
            out.append(FixCandidate(f"full-precision layers {' '.join(map(str, keep))}", a, code))
        return out


ENGINE = register_engine(HF())
