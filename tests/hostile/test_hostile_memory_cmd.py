"""Issue 24, class 9: `npllama memory -m DIR` reads params.json as `info` does (one function,
checkpoint.read_params): a params.json that is a link leading out of the folder is refused,
naming it. Fails on main c1182df (checked: the outside file was read and its table printed)."""
import json
import os

from npllama import cli

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100, "multiple_of": 32}


def test_memory_refuses_a_params_link_out_of_the_folder(tmp_path, capsys):
    (tmp_path / "elsewhere.json").write_text(json.dumps(PARAMS))
    (tmp_path / "model").mkdir()
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "model" / "params.json")
    for argv in (["memory", "-m", str(tmp_path / "model")], ["info", str(tmp_path / "model")]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "params.json").write_text(json.dumps(PARAMS))
    assert cli.main(["memory", "-m", str(tmp_path / "inside"), "--ctx", "1024"]) == 0


def test_the_refusal_names_the_link(tmp_path, capsys):
    (tmp_path / "elsewhere.json").write_text(json.dumps(PARAMS))
    (tmp_path / "model").mkdir()
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "model" / "params.json")
    assert cli.main(["memory", "-m", str(tmp_path / "model")]) == 1
    assert "params.json: leads outside" in capsys.readouterr().err
