"""vLLM: ``kv_cache_dtype`` (``--kv-cache-dtype``) and ``kv_cache_dtype_skip_layers``.

Read in ``vllm/config/cache.py`` at 002f10e0cfa1373a19a0d2756598a34b700d20e5 (``CacheDType``: auto, float16,
bfloat16, fp8, fp8_e4m3, fp8_e5m2, fp8_inc, fp8_ds_mla, nvfp4_ds_mla, turboquant_k8v4, turboquant_4bit_nc,
turboquant_k3v4_nc, turboquant_3bit_nc, int4_per_token_head, int8_per_token_head, fp8_per_token_head, nvfp4,
nvfp4_4over6; ``kv_cache_dtype_skip_layers``: layer indices kept at the model's dtype), the fp8 write kernel
(``reshape_and_cache_flash``: ``x / k_scale`` cast with saturation, scales 1.0 unless calibrated or
``calculate_kv_scales``) and the per-token-head kernels (:mod:`kvgeom.quant.formats.vllm_pth`). Proved by
``tests/engines/test_engines.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Engine, EngineFormat, FixCandidate, ModelShape, Unsimulated, register_engine

__all__ = ["VLLM"]


def _dtype(fmt: EngineFormat) -> str:
    return fmt.setting.split()[1]


class VLLM(Engine):
    name = "vllm"
    title = "vLLM"
    source = ("vllm-project/vllm: vllm/config/cache.py @002f10e0 (CacheDType, kv_cache_dtype_skip_layers), "
              "vllm/v1/attention/ops/triton_reshape_and_cache_flash.py (fp8 and per-token-head writes), "
              "vllm/v1/attention/ops/int4_per_token_head.py @055e47c2 (int4 + RHT)")
    fix_kind = "fewest kv_cache_dtype_skip_layers"

    def formats(self, shape: ModelShape) -> list[EngineFormat]:
        pw2 = shape.d_head >= 2 and not shape.d_head & (shape.d_head - 1)
        out = [
            EngineFormat("fp8_e4m3", "fp8_e4m3", "--kv-cache-dtype fp8_e4m3",
                         note="scales 1.0 (no calibrated k/v scales in the checkpoint); 'fp8' is the same dtype"),
            EngineFormat("fp8_e4m3 + calculate_kv_scales", "fp8_e4m3@amax",
                         "--kv-cache-dtype fp8_e4m3 --calculate-kv-scales",
                         note="scales amax/200 (K), amax/100 (V) measured on the first prefill (per sequence here)"),
            EngineFormat("fp8_e5m2", "fp8_e5m2", "--kv-cache-dtype fp8_e5m2"),
            EngineFormat("fp8_per_token_head", "fp8_per_token_head", "--kv-cache-dtype fp8_per_token_head"),
            EngineFormat("int8_per_token_head", "int8_per_token_head", "--kv-cache-dtype int8_per_token_head"),
        ]
        if pw2:
            out.append(EngineFormat("int4_per_token_head", "int4_per_token_head",
                                    "--kv-cache-dtype int4_per_token_head", note="Hadamard-rotated (RHT)"))
        return out

    def unsimulated(self) -> tuple[Unsimulated, ...]:
        why_fp4 = ("not simulated: the write kernel (block scales and the per-tensor global scale) was not found in "
                   "the vLLM source kvgeom read")
        return (Unsimulated("nvfp4", why_fp4), Unsimulated("nvfp4_4over6", why_fp4),
                *(Unsimulated(t, "not simulated: TurboQuant's codebooks and rotations are not implemented in kvgeom")
                  for t in ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")),
                Unsimulated("fp8_inc", "Intel Gaudi only"),
                Unsimulated("fp8_ds_mla / nvfp4_ds_mla", "MLA (DeepSeek) models only"))

    def command(self, fmt: EngineFormat, model: str) -> str:
        return f"vllm serve {model} {fmt.setting}"

    def fix_candidates(self, fmt: EngineFormat, shape: ModelShape, *, layer_order: Sequence[int],
                       budget_bits: float, max_candidates: int, model: str) -> list[FixCandidate]:
        out = []
        for size in range(1, min(max_candidates, shape.n_layers - 1) + 1):
            skip = sorted(layer_order[:size])
            a = tuple(None if i in skip else fmt.scheme for i in range(shape.n_layers))
            layers = " ".join(map(str, skip))
            out.append(FixCandidate(f"skip layers {layers}", a, f"vllm serve {model} {fmt.setting} "
                                                                 f"--kv-cache-dtype-skip-layers {layers}"))
        return out


ENGINE = register_engine(VLLM())
