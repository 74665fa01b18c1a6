"""Faults lose nothing (issue #17): a run killed at every stage boundary and in the middle of writing every file,
then resumed, gives the uninterrupted run's audit.json, and so does one whose disk fills up on the way (a clear
error, every finished stage readable); a second audit on the same --out is refused; a damaged stage file is
recomputed; an --out without room for the run is refused before any stage; rows with NaN/inf logits are counted
and shown, never judged. A tiny random model and the stand-in judge keep it fast."""

import errno
import json
from pathlib import Path

import pytest

import kvgeom.audit.page as page
import kvgeom.io as kio
from kvgeom.audit import AuditConfig, AuditError, default_stages, run_audit
from kvgeom.cli import audit_summary
from kvgeom.testing import ChecksumJudge

from ..conftest import get_tiny

#: smaller than test_audit's SMALL: every stage still runs, on fewer prompts, bits and seeds
SMALL = dict(model="tiny", n_calib=4, n_heldout=4, n_borderline=2, max_new_tokens=3, fractions=(0.25,), n_seeds=1,
             bits=(4, 2), ppl_tokens=64, batch_size=32)
STAGES = default_stages()


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def _strip(audit):
    return {k: v for k, v in audit.items() if k != "timings"}


def _run(out, **kw):
    return run_audit(AuditConfig(**SMALL), out, model=get_tiny("llama"), judge=ChecksumJudge(), **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out)
    return out, json.loads((out / "audit.json").read_text())


def _kill_mid_write(monkeypatch, name):
    """Make the atomic writer die in the middle of writing ``name``: half its bytes in the temporary file, the
    target untouched, as a SIGKILL during the write leaves them."""
    real = kio.atomic_write_text

    def dying(path, text, **kw):
        path = Path(path)
        if path.name == name:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.killed.tmp").write_text(text[: len(text) // 2])
            raise Killed(f"killed while writing {name}")
        return real(path, text, **kw)

    monkeypatch.setattr(kio, "atomic_write_text", dying)
    monkeypatch.setattr(page, "atomic_write_text", dying)


def _kill_at_start(stage):
    def progress(name, event):
        if name == stage and event.startswith("start"):
            raise Killed(f"killed before {stage}")
    return progress


def test_killed_at_every_boundary_and_mid_write_then_resumed_is_the_same_audit(reference, tmp_path, monkeypatch):
    _, ref = reference
    out = tmp_path / "killed"
    writes = ["_config.json", *[f"{s}.json" for s in STAGES], "audit.json", "report.html"]
    resume = False
    for name in writes:
        with monkeypatch.context() as m:
            _kill_mid_write(m, name)
            with pytest.raises(Killed):
                _run(out, resume=resume)
        resume = True
        folder = out if name in ("audit.json", "report.html") else out / "stages"
        assert (folder / f".{name}.killed.tmp").is_file() and not (folder / name).exists(), name
        stage = Path(name).stem
        if stage == STAGES[3]:  # and the disk fills up while this stage is written again
            _disk_full_at(monkeypatch, out, stage, ref)
        if stage in STAGES and stage != STAGES[-1]:  # then a kill on the boundary after it
            nxt = STAGES[STAGES.index(stage) + 1]
            with pytest.raises(Killed):
                _run(out, resume=True, progress=_kill_at_start(nxt))
            saved = json.loads((out / "stages" / name).read_text())
            assert saved["result"] == ref["stages"][stage], stage
            assert not (out / "stages" / f"{nxt}.json").exists()
        assert not (out / "audit.json").exists() or name == "report.html"
    events = []
    _run(out, resume=True, progress=lambda n, e: events.append((n, e)))
    assert _strip(json.loads((out / "audit.json").read_text())) == _strip(ref)
    assert ref["stages"]["label"]["label"] in (out / "report.html").read_text()
    assert {n for n, e in events if e == "resumed"} == set(STAGES)  # nothing was computed twice at the end
    assert not list(out.rglob("*.tmp"))  # a killed writer's temporary files are cleaned up by the next run


def test_a_second_audit_on_the_same_out_is_refused(tmp_path):
    with kio.lock_folder(tmp_path / "busy"):
        with pytest.raises(AuditError, match=r"--out .*busy': another kvgeom audit is writing to this folder now"):
            run_audit(AuditConfig(**SMALL), tmp_path / "busy", judge=ChecksumJudge())  # before the model loads
    assert not (tmp_path / "busy" / "stages").exists()


def _disk_full_at(monkeypatch, out, victim, ref):
    """A resumed run whose write of ``victim`` finds the disk full: one AuditError naming the folder, its free space
    and the finished stages, each still whole (the chain test then resumes from them)."""
    real = kio.atomic_write_text

    def full(path, text, **kw):
        if Path(path).name == f"{victim}.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text, **kw)

    with monkeypatch.context() as m:
        m.setattr(kio, "atomic_write_text", full)
        with pytest.raises(AuditError) as err:
            _run(out, resume=True)
    msg = str(err.value)
    done = STAGES[:STAGES.index(victim)]
    assert f"--out {str(out)!r}: the disk is full (No space left on device;" in msg
    assert f"free there) while writing {victim}.json" in msg and "then run again with --resume" in msg
    assert f"finished stages {', '.join(sorted(done))} are saved whole" in msg
    for s in done:
        assert json.loads((out / "stages" / f"{s}.json").read_text())["result"] == ref["stages"][s]
    assert not (out / "stages" / f"{victim}.json").exists()


def test_a_damaged_stage_file_is_recomputed_on_resume(reference, tmp_path):
    import shutil

    ref_dir, ref = reference
    out = tmp_path / "damaged"
    shutil.copytree(ref_dir, out)
    path = out / "stages" / "layer_sweep.json"
    path.write_text(path.read_text()[:100])  # cut short by something that is not kvgeom's writer
    (out / "stages" / "pcr.json").write_text('{"not": "a stage"}')
    events = []
    _run(out, resume=True, progress=lambda n, e: events.append((n, e)))
    assert ("layer_sweep", "start (its saved file does not parse: recomputed)") in events
    assert ("pcr", "start (its saved file does not parse: recomputed)") in events
    assert _strip(json.loads((out / "audit.json").read_text())) == _strip(ref)


def test_an_out_without_room_for_the_run_is_refused_before_any_stage(tmp_path, monkeypatch):
    import kvgeom.audit.checks as checks

    monkeypatch.setattr(checks, "free_bytes", lambda path: 1000)
    with pytest.raises(AuditError, match=r"--out .*: 1000 B free there, but this audit writes about [\d.]+ MiB "
                                         r"\(stage files, audit.json, report.html\); free some space"):
        _run(tmp_path / "small")
    assert not (tmp_path / "small" / "stages").exists()


def test_the_space_estimate_covers_the_default_audit():
    """The estimate is at least what the measured default audit wrote (6.1 MB: /tmp/audit_idle, 2026-12-02)."""
    from types import SimpleNamespace

    from kvgeom.audit import estimate_out_bytes

    qwen = SimpleNamespace(n_layers=24, n_kv_heads=2, d_head=64)
    need = estimate_out_bytes(AuditConfig(), qwen)
    assert 6.1e6 <= need <= 12e6


def test_nonfinite_rows_are_counted_and_shown_never_judged(tmp_path, monkeypatch):
    """One row of the layer sweep with NaN logits: verdict 'nonfinite', left out of layer 1's flip rate, counted in
    audit.json, the summary and the report."""
    import kvgeom.evaluate.core as ev

    real = ev.generate
    hit = []

    def one_nan(*a, **k):
        out = real(*a, **k)
        for i, p in enumerate(k.get("plans") or []):
            if p is not None and p.label == "L1" and not hit:
                out.extra["nonfinite"][i] = True
                hit.append(i)
        return out

    monkeypatch.setattr(ev, "generate", one_nan)
    res = _run(tmp_path / "nan")
    audit = json.loads((tmp_path / "nan" / "audit.json").read_text())
    assert audit["nonfinite"] == {"rows": 1, "by_stage": {"layer_sweep": 1}}
    sweep = audit["stages"]["layer_sweep"]
    assert list(sweep["verdicts"]["L1"].values()).count("nonfinite") == 1
    assert sweep["layers"][1]["nonfinite"] == 1 and sweep["layers"][1]["n"] == sweep["layers"][0]["n"] - 1
    assert "NONFINITE" in audit_summary(res.audit) and "1 generated rows had NaN/inf logits" in audit_summary(audit)
    assert "Rows with NaN/inf logits" in (tmp_path / "nan" / "report.html").read_text()
    saved = json.loads((tmp_path / "nan" / "stages" / "layer_sweep.json").read_text())
    assert saved["nonfinite"] == 1
