import pytest

from kvgeom.sites import KV_SITES, SITES, hook_name, parse_hook_name


def test_hook_names_round_trip():
    assert hook_name("rot_k", 3) == "blocks.3.attn.hook_rot_k"
    assert hook_name("resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert parse_hook_name("blocks.11.attn.hook_v") == ("v", 11)
    for site in SITES:
        assert parse_hook_name(hook_name(site, 7)) == (site, 7)
    with pytest.raises(ValueError, match="valid sites"):
        hook_name("attn", 0)
    with pytest.raises(ValueError, match="per-layer hook name"):
        parse_hook_name("hook_embed")
    assert set(KV_SITES) <= set(SITES)


def test_sites_is_the_ground_floor():
    """kvgeom.sites imports nothing of kvgeom (every layer may import it)."""
    import ast
    import inspect

    import kvgeom.sites

    tree = ast.parse(inspect.getsource(kvgeom.sites))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("kvgeom")]
