"""Which of the cache's two tensors a K/V tensor is: :data:`Role`, ``"k"`` or ``"v"``.

The ground floor of :mod:`kvgeom.quant` (it imports nothing of kvgeom): the formats (:mod:`kvgeom.quant.formats`,
which hand it on as ``kvgeom.quant.formats.Role``), their cache rules and their math all take a role.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Role"]

Role = Literal["k", "v"]
