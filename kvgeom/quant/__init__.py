"""KV-cache quantization: scheme values, a stateless ``fake_quant`` and a streaming cache quantizer.

>>> from kvgeom.quant import Scheme
>>> s = Scheme.parse("K:kivi2,V:q8_0")
>>> str(s), s.for_role("v"), Scheme.parse("q4_0").bits_per_element
('K:kivi2-g32-r128,V:q8_0', GGMLSpec(qtype='q8_0', rotate=False), 4.5)
"""

from kvgeom.deprecation import moved

from .fake import fake_quant
from .formats import FORMATS, KVFormat, register_format
from .plan import QuantPlan
from .row_mix import RowMix, mix_code
from .scheme import (
    DEFAULT_D_HEAD,
    DEFAULT_N_KV_HEADS,
    VALID_FORMS,
    BaseSpec,
    CastSpec,
    FP8Spec,
    GGMLSpec,
    IntSpec,
    KIVISpec,
    Role,
    Scheme,
    expand_family,
    valid_forms,
)
from .stream import StreamQuantizer

__all__ = [
    "DEFAULT_D_HEAD",
    "DEFAULT_N_KV_HEADS",
    "FORMATS",
    "VALID_FORMS",
    "BaseSpec",
    "CastSpec",
    "FP8Spec",
    "GGMLSpec",
    "IntSpec",
    "KIVISpec",
    "KVFormat",
    "QuantPlan",
    "Role",
    "RowMix",
    "Scheme",
    "StreamQuantizer",
    "expand_family",
    "fake_quant",
    "mix_code",
    "register_format",
    "valid_forms",
]

#: The plan runtime moved to :mod:`kvgeom.runtime.plans`.
__getattr__ = moved(__name__, {"apply_plans": "kvgeom.runtime.plans", "forward_with_plans": "kvgeom.runtime.plans"})
