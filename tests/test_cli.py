from kvgeom.cli import main


def test_models_command(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct" in out and "hash verified" in out


def test_info_bad_model_is_clear(capsys):
    assert main(["info", "./no-such-dir"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_info_default_model(capsys, default_model):
    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"n_layers": 24' in out and '"n_kv_heads": 2' in out and '"d_head": 64' in out
