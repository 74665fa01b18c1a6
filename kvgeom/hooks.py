"""Deprecated: moved to :mod:`kvgeom.sites` (``SITES``, ``KV_SITES``, ``hook_name``, ``parse_hook_name``) and
:mod:`kvgeom.runtime.hooks` (``kv_hooks``, ``HookContext``, ``HookSession``, ...); removed in kvgeom 0.3."""

from kvgeom.deprecation import moved

__getattr__ = moved(__name__, {
    **{name: "kvgeom.sites" for name in ("KV_SITES", "SITES", "hook_name", "parse_hook_name")},
    **{name: "kvgeom.runtime.hooks" for name in ("CallInfo", "HookContext", "HookFn", "HookSession", "kv_hooks",
                                                 "set_call")},
})
