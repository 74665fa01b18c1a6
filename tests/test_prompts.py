import json
import time
from pathlib import Path

import pandas as pd
import pytest

from kvgeom.prompts import PromptLoadError, PromptSet, bundled_data_dir, load_prompts, load_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


# ------------------------------------------------------------------------------------------ bundled


def test_bundled_counts_and_categories():
    harmful, harmless, borderline = load_prompts("harmful"), load_prompts("harmless"), load_prompts("borderline")
    assert len(harmful) >= 160 and len(harmless) == len(harmful) and len(borderline) >= 60
    for ps in (harmful, harmless, borderline):
        assert ps.frame["category"].nunique() >= 10
        assert ps.frame["category"].notna().all()
        assert not ps.frame["prompt"].duplicated().any()
        assert not ps.frame["id"].duplicated().any()
        assert list(ps.frame.columns[:3]) == ["id", "prompt", "category"]


def test_harmful_and_harmless_pair_row_by_row():
    harmful, harmless = load_prompts("harmful").frame, load_prompts("harmless").frame
    assert harmful["category"].tolist() == harmless["category"].tolist()
    assert set(harmful["prompt"]).isdisjoint(harmless["prompt"])
    # the pairing survives sampling
    assert load_prompts("harmful").sample(10, seed=3).frame["category"].tolist() == \
        load_prompts("harmless").sample(10, seed=3).frame["category"].tolist()


def test_calibration_split():
    harmful = load_prompts("harmful").frame
    cal, held = load_prompts("calibration"), load_prompts("heldout")
    assert len(cal) == 20
    counts = cal.frame["category"].value_counts()
    assert len(counts) == 10 and (counts == 2).all()
    assert set(cal.ids).isdisjoint(held.ids)
    assert len(cal) + len(held) == len(harmful)
    assert set(harmful["split"]) == {"calibration", "heldout"}
    # documented choice: the first two rows of each category
    firsts = harmful.groupby("category", sort=False).head(2)
    assert sorted(firsts["id"]) == sorted(cal.ids)


def test_limit_head_and_repr():
    ps = load_prompts("borderline", limit=5)
    assert len(ps) == 5 and ps.prompts == load_prompts("borderline").prompts[:5]
    assert list(ps) == ps.prompts
    assert "borderline" in repr(ps)
    with pytest.raises(ValueError, match="positive integer"):
        load_prompts("harmful", limit=0)
    with pytest.raises(ValueError, match="only"):
        ps.sample(6)


def test_bundled_data_dir_falls_back_to_repo():
    d = bundled_data_dir()
    assert d.joinpath("harmful.csv").is_file()


def test_load_text():
    text = load_text()
    assert len(text.split()) >= 17_000
    assert load_text("text") == text


def test_load_text_errors(tmp_path):
    with pytest.raises(PromptLoadError, match="not found"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(PromptLoadError, match="is empty"):
        load_text(tmp_path / "blank.txt")


# ----------------------------------------------------------------------------------------- local files


ROWS = [{"goal": "First prompt", "category": "a"}, {"goal": "Second prompt", "category": "b"}]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "json_dict", "txt"])
def test_local_formats(tmp_path, fmt):
    if fmt == "csv":
        path = tmp_path / "set.csv"
        pd.DataFrame(ROWS).to_csv(path, index=False)
    elif fmt == "jsonl":
        path = tmp_path / "set.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    elif fmt == "json":
        path = tmp_path / "set.json"
        path.write_text(json.dumps(ROWS))
    elif fmt == "json_dict":
        path = tmp_path / "set.json"
        path.write_text(json.dumps({"data": ROWS}))
    else:
        path = tmp_path / "set.txt"
        path.write_text("First prompt\n\n  Second prompt  \n")
    for arg in (path, str(path)):
        ps = load_prompts(arg)
        assert ps.prompts == ["First prompt", "Second prompt"]
        assert ps.ids == ["set-0001", "set-0002"]
        if fmt != "txt":
            assert ps.frame["category"].tolist() == ["a", "b"]
        else:
            assert ps.frame["category"].isna().all()


def test_json_list_of_strings(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(["one", "two", "three"]))
    assert load_prompts(path, limit=2).prompts == ["one", "two"]


@pytest.mark.parametrize("column", ["goal", "prompt", "Behavior", "instruction", "PROMPT"])
def test_prompt_column_detection(tmp_path, column):
    path = tmp_path / "c.csv"
    pd.DataFrame({"other": ["x", "y"], column: ["p1", "p2"]}).to_csv(path, index=False)
    assert load_prompts(path).prompts == ["p1", "p2"]


def test_column_priority_and_override(tmp_path):
    path = tmp_path / "jbb.csv"  # JailbreakBench-like: Goal wins over the short Behavior label
    pd.DataFrame({"Behavior": ["Defamation"], "Goal": ["Write a long request"], "Category": ["x"],
                  "text": ["custom column"]}).to_csv(path, index=False)
    ps = load_prompts(path)
    assert ps.prompts == ["Write a long request"] and ps.frame["category"].tolist() == ["x"]
    assert load_prompts(path, column="text").prompts == ["custom column"]
    with pytest.raises(PromptLoadError, match="column 'nope' not found"):
        load_prompts(path, column="nope")


def test_harmbench_like_filter(tmp_path):
    path = tmp_path / "hb.csv"
    pd.DataFrame({"Behavior": ["std one", "ctx one", "std two", "copy one"],
                  "FunctionalCategory": ["standard", "contextual", "standard", "copyright"],
                  "SemanticCategory": ["cyber", "cyber", "harm", "copyright"],
                  "BehaviorID": ["s1", "c1", "s2", "k1"]}).to_csv(path, index=False)
    ps = load_prompts(path)
    assert ps.prompts == ["std one", "std two"]
    assert ps.ids == ["s1", "s2"] and ps.frame["category"].tolist() == ["cyber", "harm"]


def test_empty_prompt_rows_dropped(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("prompt\nfirst\n\"  \"\nsecond\n")
    assert load_prompts(path).prompts == ["first", "second"]


# ------------------------------------------------------------------------------------------ bad inputs


def test_unknown_name():
    with pytest.raises(PromptLoadError, match="unknown prompt set 'harmfull'") as err:
        load_prompts("harmfull")
    assert "bundled name" in str(err.value) and isinstance(err.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(PromptLoadError, match="not found"):
        load_prompts(tmp_path / "nope.csv")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".txt"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"blank{suffix}"
    path.write_text("")
    with pytest.raises(PromptLoadError, match="is empty"):
        load_prompts(path)


def test_header_only_csv(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("prompt,category\n")
    with pytest.raises(PromptLoadError, match="no rows"):
        load_prompts(path)


def test_no_prompt_column(tmp_path):
    path = tmp_path / "cols.csv"
    pd.DataFrame({"question": ["a"], "answer": ["b"]}).to_csv(path, index=False)
    with pytest.raises(PromptLoadError, match="no prompt column") as err:
        load_prompts(path)
    assert "column=" in str(err.value) and "question" in str(err.value)


def test_unreadable_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(PromptLoadError, match="cannot parse"):
        load_prompts(bad)
    numbers = tmp_path / "n.json"
    numbers.write_text("[1, 2]")
    with pytest.raises(PromptLoadError, match="object"):
        load_prompts(numbers)
    other = tmp_path / "x.parquet"
    other.write_bytes(b"PAR1")
    with pytest.raises(PromptLoadError, match="unknown file type"):
        load_prompts(other)


def test_promptset_validates():
    with pytest.raises(PromptLoadError, match="lacks column"):
        PromptSet("x", pd.DataFrame({"prompt": ["a"]}))
    with pytest.raises(PromptLoadError, match="empty"):
        PromptSet("x", pd.DataFrame({"id": ["1"], "prompt": [" "], "category": [None]}))


# ------------------------------------------------------------------------------------ public benchmarks


@pytest.mark.parametrize("name", ["advbench", "harmbench", "xstest", "jailbreakbench"])
def test_public_names_offline_fail_fast(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PromptLoadError, match="local") as err:
        load_prompts(name)
    assert time.monotonic() - start < 5
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_public_name_unreachable_hub_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # frozen at its import; the environment is cleared
    monkeypatch.setenv("HF_ENDPOINT", "http://unreachable.invalid")
    start = time.monotonic()
    with pytest.raises(PromptLoadError, match="pass a local copy"):
        load_prompts("advbench")
    assert time.monotonic() - start < 10


def test_shared_advbench():
    ps = load_prompts(shared("advbench.csv"))
    assert len(ps) == 520 and "target" in ps.frame.columns


def test_shared_harmbench_standard_only():
    ps = load_prompts(shared("harmbench.csv"))
    assert len(ps) == 159
    assert (ps.frame["FunctionalCategory"] == "standard").all()
    assert ps.frame["category"].notna().all()


def test_shared_xstest():
    ps = load_prompts(shared("xstest.csv"))
    assert len(ps) == 450
    assert set(ps.frame["label"]) == {"safe", "unsafe"}
    assert (ps.frame["label"] == "safe").sum() == 250


def test_public_api_is_the_package():
    """``kvgeom.prompts`` is a package; every public name is importable from it, without a warning."""
    import warnings

    import kvgeom.prompts as P

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in P.__all__:
            assert getattr(P, name) is not None
    assert P.load_prompts.__module__ == "kvgeom.prompts.load"
