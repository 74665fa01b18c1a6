"""KV-cache quantization: scheme values, a stateless ``fake_quant`` and a streaming cache quantizer.

>>> from kvgeom.quant import Scheme
>>> s = Scheme.parse("K:kivi2,V:q8_0")
>>> str(s), s.for_role("v"), Scheme.parse("q4_0").bits_per_element
('K:kivi2-g32-r128,V:q8_0', GGMLSpec(qtype='q8_0', rotate=False), 4.5)
"""

from .fake import fake_quant
from .plan import QuantPlan, apply_plans, forward_with_plans
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
)
from .stream import StreamQuantizer

__all__ = [
    "DEFAULT_D_HEAD",
    "DEFAULT_N_KV_HEADS",
    "VALID_FORMS",
    "BaseSpec",
    "CastSpec",
    "FP8Spec",
    "GGMLSpec",
    "IntSpec",
    "KIVISpec",
    "QuantPlan",
    "Role",
    "Scheme",
    "StreamQuantizer",
    "apply_plans",
    "fake_quant",
    "forward_with_plans",
]
