"""Validate before work (issue #17): every numeric setting out of its range, a bad ``--out``, a scheme that does not
apply to the model and a prompt longer than its context are each one :class:`AuditError` naming the option, the
value, the limit and the fix: the settings before the model loads, the model's own limits right after it loads
and before any stage or file."""

import dataclasses
import errno
import math

import pytest

from kvgeom.audit import AuditConfig, AuditError, AuditInputs, check_model, run_audit
from kvgeom.audit.config import FLOAT_RANGES, INT_RANGES
from kvgeom.cli import main
from kvgeom.testing import ChecksumJudge, tiny_model

from ..conftest import get_tiny

# model "tiny" is no model: a check that passed would go on to load it and fail with another error
SMALL = dict(model="tiny", n_calib=6, n_heldout=6, n_borderline=3, max_new_tokens=4, fractions=(0.05, 0.25),
             n_seeds=2, bits=(8, 4, 2), ppl_tokens=128, batch_size=32)

BAD_NUMBERS = [
    ("n_calib", 1, "--calib 1: must be >= 2"),
    ("n_calib", 2.5, "--calib 2.5: must be a whole number >= 2"),
    ("n_calib", True, "--calib True: must be a whole number"),
    ("n_calib", 21, "--calib 21: the bundled calibration split holds 20 prompts; pass --calib 20 or less"),
    ("n_heldout", -1, "AuditConfig.n_heldout=-1: must be >= 0"),
    ("n_borderline", 0, "AuditConfig.n_borderline=0: must be >= 1"),
    ("max_new_tokens", 0, "--max-new-tokens 0: must be >= 1 (tokens generated and judged per completion)"),
    ("max_new_tokens", -5, "--max-new-tokens -5: must be >= 1"),
    ("n_seeds", 0, "AuditConfig.n_seeds=0: must be >= 1"),
    ("ppl_tokens", 1, "--ppl-tokens 1: must be >= 2"),
    ("ppl_window", 1, "--ppl-window 1: must be >= 2"),
    ("ppl_stride", 0, "--ppl-stride 0: must be >= 1"),
    ("ppl_stride", 600, "--ppl-stride 600: must be at most --ppl-window (512)"),
    ("batch_size", 0, "--batch-size 0: must be >= 1"),
    ("seed", -1, "--seed -1: must be in [0, 4,294,967,295]"),
    ("seed", 2**32, "--seed 4294967296: must be in [0, 4,294,967,295]"),
    ("n_resamples", 99, "--n-resamples 99: must be in [100, 100,000]"),
    ("n_resamples", 10**6, "--n-resamples 1000000: must be in [100, 100,000]"),
    ("pcr_max_layers", 0, "AuditConfig.pcr_max_layers=0: must be >= 1"),
    ("sensitivity_prompts", 1, "AuditConfig.sensitivity_prompts=1: must be >= 2"),
    ("grow_step", 0, "--grow-step 0: must be >= 1 (--until-stable budget"),
    ("max_calib", 4, "--max-calib 4: --until-stable budget: must be >= --calib (6); pass --max-calib 400"),
    ("top_frac", 0.0, "AuditConfig.top_frac=0.0: must be a number in (0, 1)"),
    ("top_frac", 1.0, "AuditConfig.top_frac=1.0: must be a number in (0, 1)"),
    ("label_confidence", 0.5, "--label-confidence 0.5: must be a number in (0.5, 1]"),
    ("label_confidence", 1.5, "--label-confidence 1.5: must be a number in (0.5, 1]"),
    ("pcr_min_p", 0.0, "AuditConfig.pcr_min_p=0.0: must be a number in (0, 1]"),
    ("min_recovery_gap", -0.1, "--min-recovery-gap -0.1: must be a number in [0, 1]"),
    ("min_recovery_gap", 1.1, "--min-recovery-gap 1.1: must be a number in [0, 1]"),
    ("max_minutes", 0.0, "--max-minutes 0.0: must be a number in (0, inf]"),
    ("max_minutes", math.nan, "--max-minutes nan: must be a number in (0, inf]"),
    ("fractions", (), "AuditConfig.fractions=(): must be one or more shares in (0, 1]"),
    ("fractions", (0.0, 0.5), "AuditConfig.fractions=(0.0, 0.5): must be one or more shares in (0, 1]"),
    ("fractions", (1.5,), "AuditConfig.fractions=(1.5,): must be one or more shares in (0, 1]"),
    ("bits", (), "AuditConfig.bits=(): must be one or more whole bit-widths in [1, 16]"),
    ("bits", (8, 0), "AuditConfig.bits=(8, 0): must be one or more whole bit-widths in [1, 16]"),
    ("bits", (17,), "AuditConfig.bits=(17,): must be one or more whole bit-widths in [1, 16]"),
]


@pytest.mark.parametrize("field, value, message", BAD_NUMBERS, ids=[f"{f}={v!r}" for f, v, _ in BAD_NUMBERS])
def test_every_number_out_of_range_is_refused_before_the_model_loads(tmp_path, field, value, message):
    with pytest.raises(AuditError) as err:
        run_audit(AuditConfig(**{**SMALL, field: value}), tmp_path / "out")
    msg = str(err.value)
    assert msg.startswith(message), msg
    assert "; pass " in msg or "; set " in msg  # the fix
    assert not (tmp_path / "out").exists()  # nothing written, nothing loaded


def test_a_bit_sweep_without_a_point_is_refused():
    with pytest.raises(AuditError, match=r"AuditConfig.bits=\(8,\): the bit sweep of --scheme 'kivi2-g32-r32' has "
                                         r"no point.*pass bit-widths the family admits: 2, 4$"):
        run_audit(AuditConfig(**{**SMALL, "scheme": "kivi2-g32-r32", "bits": (8,)}))


def test_every_numeric_setting_has_a_range():
    """A numeric setting added to AuditConfig must be added to the checks (INT_RANGES, FLOAT_RANGES, or the
    tuple checks of fractions and bits)."""
    checked = {f for f, *_ in INT_RANGES} | {f for f, *_ in FLOAT_RANGES} | {"fractions", "bits"}
    numeric = {f.name for f in dataclasses.fields(AuditConfig)
               if type(f.default) in (int, float) or (isinstance(f.default, tuple) and f.default
                                                      and all(type(x) in (int, float) for x in f.default))}
    assert numeric == checked


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be >= 1"),
    (["--quick", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--calib", "1"], "--calib 1: must be >= 2"),
    (["--seed", "-1"], "--seed -1: must be in [0, 4,294,967,295]"),
    (["--label-confidence", "0.3"], "--label-confidence 0.3: must be a number in (0.5, 1]"),
    (["--n-resamples", "5"], "--n-resamples 5: must be in [100, 100,000]"),
    (["--min-recovery-gap", "2"], "--min-recovery-gap 2.0: must be a number in [0, 1]"),
    (["--grow-step", "0"], "--grow-step 0: must be >= 1"),
    (["--max-calib", "3"], "--max-calib 3: --until-stable budget: must be >= --calib (20)"),
    (["--max-minutes", "0"], "--max-minutes 0.0: must be a number in (0, inf]"),
])
def test_cli_numbers_are_one_error_line_before_any_work(tmp_path, capsys, args, message):
    assert main(["audit", *args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kvgeom: error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a").exists()


# ---- --out ---------------------------------------------------------------------------------------------
def test_out_under_a_file_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    bad = tmp_path / "f.txt" / "out"
    with pytest.raises(AuditError, match=rf"^--out '{bad}': cannot create the output folder: it is under "
                                         rf"{tmp_path / 'f.txt'}, which is a file, not a folder; pass --out a folder"):
        run_audit(AuditConfig(**SMALL), bad)


def test_out_not_writable_is_refused(tmp_path, monkeypatch):
    import kvgeom.io

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(kvgeom.io.tempfile, "mkstemp", read_only)
    with pytest.raises(AuditError, match=rf"^--out '{tmp_path / 'o'}': the output folder exists but cannot be "
                                         r"written: Read-only file system; pass --out"):
        run_audit(AuditConfig(**SMALL), tmp_path / "o")


@pytest.mark.parametrize("command", [["audit"], ["sweep", "--family", "q4_0"], ["sensitivity"]])
def test_cli_out_errors_name_the_option(tmp_path, capsys, command):
    (tmp_path / "f.txt").write_text("x")
    assert main([*command, "--out", str(tmp_path / "f.txt" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvgeom: error: --out '{tmp_path / 'f.txt' / 'out'}': cannot create the output folder")


# ---- the model's own limits, right after it loads ------------------------------------------------------------
@pytest.fixture(scope="module")
def d96():
    """A tiny llama with d_head 96: a multiple of 32 (llama.cpp blocks) but not of 64 (+rot), and not of 64 (KIVI
    g64)."""
    return tiny_model("llama", head_dim=96)


@pytest.mark.parametrize("scheme, cause", [
    ("q4_0+rot", "+rot models llama.cpp's Hadamard rotation, which it enables only when d_head is a multiple of 64"),
    ("kivi2-g64-r64", "quantizes values in groups of G=64 channels of each head, but d_head=96 is not a multiple "
                      "of 64; choose a group size dividing d_head, e.g. kivi2-g48-r64"),
    ("K:q8_0,V:q4_0+rot", "multiple of 64"),
])
def test_a_scheme_that_does_not_apply_is_refused_before_any_stage(d96, tmp_path, scheme, cause):
    with pytest.raises(AuditError) as err:
        run_audit(AuditConfig(**{**SMALL, "scheme": scheme}), tmp_path / "o", model=d96, judge=ChecksumJudge())
    msg = str(err.value)
    assert msg.startswith(f"--scheme {scheme!r} does not apply to tiny-llama (d_head 96, 2 KV heads): "), msg
    assert cause in msg
    assert not (tmp_path / "o" / "stages").exists()  # no stage ran, no settings recorded


def test_schemes_that_apply_pass(d96):
    check_model(AuditInputs.build(d96, AuditConfig(**{**SMALL, "scheme": "q4_0"})))
    check_model(AuditInputs.build(d96, AuditConfig(**{**SMALL, "scheme": "kivi2-g32-r32"})))


def test_the_sweep_scheme_and_search_levels_are_checked_too(d96):
    with pytest.raises(AuditError, match=r"^AuditConfig.search_levels='q4_0\+rot' does not apply"):
        check_model(AuditInputs.build(d96, AuditConfig(**{**SMALL, "search_levels": ("q8_0", "q4_0+rot")})))
    with pytest.raises(AuditError, match=r"^AuditConfig.sweep_scheme='int3-group128-sym' does not apply.*group size"):
        check_model(AuditInputs.build(d96, AuditConfig(**{**SMALL, "sweep_scheme": "int3-group128-sym"})))


def test_a_site_the_bridge_does_not_fire_is_refused():
    phi = get_tiny("phi3")
    with pytest.raises(AuditError, match=r"^--scheme 'int4-token-asym': plan .* site 'rot_k' is not available"):
        check_model(AuditInputs.build(phi, AuditConfig(**{**SMALL, "site": "rot_k"})))


def test_a_prompt_longer_than_the_context_is_refused_before_any_stage(tmp_path):
    from kvgeom.prompts import load_prompts

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(["How do I pick a lock?"] * 3 + ["bread and water " * 400] + ["Say hi."] * 6))
    long_id = load_prompts(harmful).ids[3]
    cfg = AuditConfig(**{**SMALL, "harmful": str(harmful), "harmless": str(harmful)})
    with pytest.raises(AuditError) as err:
        run_audit(cfg, tmp_path / "o", model=get_tiny("llama"), judge=ChecksumJudge())
    msg = str(err.value)
    assert msg.startswith(f"--harmful {str(harmful)!r}: prompt {long_id} ('bread and water"), msg
    assert "tokens chat-formatted, + --max-new-tokens 4" in msg and "context of 512 tokens" in msg
    assert "never truncates" in msg and "lower --max-new-tokens" in msg
    assert not (tmp_path / "o" / "stages").exists()


def test_max_new_tokens_beyond_the_context_is_refused():
    with pytest.raises(AuditError, match=r"^--max-new-tokens 600: must be below the model's context of 512"):
        check_model(AuditInputs.build(get_tiny("llama"), AuditConfig(**{**SMALL, "max_new_tokens": 600})))
