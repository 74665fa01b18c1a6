"""Fused Triton quantize-dequantize kernels for K/V ``[batch, pos, kv_head, d_head]``, bit-identical to eager.

* :mod:`.common`: the shared exact helpers, launch settings (``TUNE``) and the :class:`~.common.Kernel` protocol;
* :mod:`.block`: per-position blocks (``int{b}-{token|head|group{G}}-*``, llama.cpp ``q8_0`` ... ``q5_1``);
* :mod:`.ranged`: ranges over a row (``int{b}-{tensor|channel}-*``, ``fp8_*`` static and ``@amax``);
* :mod:`.kivi`: KIVI (forward mode);
* :mod:`.rotated`: llama.cpp's ``+rot`` types (rotation, block quantizer and rotation back in one kernel);
* :mod:`.pth`: vLLM's per-token-head dtypes (``int8``/``fp8``/``int4_per_token_head``);
* :mod:`.mixed`: batch rows of different llama.cpp types (``+rot`` or not) in one launch;
* :mod:`.dispatch`: :func:`~.dispatch.fused_fake_quant`, which runs a spec's kernel (or returns None).

Importing this package needs Triton (``kvgeom.quant.kernels.triton_package`` returns None without it). Which
format runs which kernel is declared by the format (:meth:`kvgeom.quant.formats.KVFormat.kernel`).
Proved by ``tests/quant/test_triton_kernels.py``.
"""

from . import block, common, dispatch, kivi, mixed, pth, ranged, rotated
from .common import GRID_YZ, MAX_BLOCK, TUNE, Kernel
from .dispatch import OPT_IN, fused_fake_quant, supported
from .kivi import KIVI_TUNE, kivi_fused, kivi_supported

__all__ = [
    "GRID_YZ", "KIVI_TUNE", "MAX_BLOCK", "OPT_IN", "TUNE", "Kernel", "block", "common", "dispatch",
    "fused_fake_quant", "kivi", "kivi_fused", "kivi_supported", "mixed", "pth", "ranged", "rotated", "supported",
]
