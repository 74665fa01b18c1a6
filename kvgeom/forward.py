"""Deprecated: moved to :mod:`kvgeom.runtime.forward`; removed in kvgeom 0.3.

``kvgeom.forward`` is also the public function :func:`kvgeom.runtime.forward.forward`. Importing this module
makes Python set ``kvgeom.forward`` to the module, so the module stays callable as that function: old code
that imports ``kvgeom.forward.encode`` and then calls ``kvgeom.forward(model, ...)`` keeps working
(``tests/runtime/test_forward.py::test_old_forward_module_keeps_kvgeom_forward_callable``).
"""

import sys
import types

from kvgeom.deprecation import moved_module

__getattr__ = moved_module(__name__, "kvgeom.runtime.forward")


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from kvgeom.runtime.forward import forward

        return forward(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
