"""`rayrec data ...` end to end through the CLI entry point."""

import json
from pathlib import Path

import pytest

from rayrec.cli import main

U_DATA = "".join(f"{u}\t{i}\t{1 + (u + i) % 5}\t{880000000 + 100 * u + i}\n" for u in range(1, 7) for i in range(1, 9))
U_ITEM = "".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|" + "|".join("1" if g == i % 19 else "0" for g in range(19)) + "\n"
                 for i in range(1, 9))


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "data" in out and "train" in out
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "--on-bad-line" in capsys.readouterr().out


def test_synth_then_info(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--users", "50", "--items", "40", "--no-images"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["users"] == 50 and info["split_sizes"]["valid_rows"] == 50 and 0 < info["sparsity"] < 1
    assert info["train_seq_len"]["p50"] > 0


def test_synth_knobs_reach_the_generator_and_the_manifest(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--users", "60", "--items", "60", "--topics", "6",
                 "--styles", "3", "--new-items", "0.2", "--no-images"]) == 0
    synth = json.loads((out / "manifest.json").read_text())["params"]["synth"]
    assert synth["styles"] == 3 and synth["new_items"] == 0.2 and synth["new_window"] == 3
    import pandas as pd

    assert pd.read_parquet(out / "items.parquet")["genres"].nunique() == 2  # 6 topics = 2 genres x 3 looks
    capsys.readouterr()
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--topics", "6", "--styles", "4", "--no-images"]) != 0
    assert "styles (4) must be 0 (off) or divide topics (6)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_prepare_movielens_100k_fixture(tmp_path, capsys):
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    (raw / "u.data").write_text(U_DATA)
    (raw / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(out), "--min-rating", "2"]) == 0
    printed = capsys.readouterr().out
    assert "users" in printed and "movielens-100k" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["filters"]["min_rating"] == 2 and manifest["counts"]["users"] == 6
    assert manifest["removed_by_filter"]["min_rating"] == sum(1 for u in range(1, 7) for i in range(1, 9) if 1 + (u + i) % 5 < 2)


def test_bad_line_error_and_skip(tmp_path, capsys):
    raw = tmp_path / "ml"
    raw.mkdir()
    (raw / "u.data").write_text(U_DATA + "7\tx\t3\t880000000\n")
    args = ["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{raw / 'u.data'}:49" in err
    assert not (tmp_path / "o").exists()
    assert main(args + ["--on-bad-line", "skip"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["skipped_lines"] == 1


def test_unknown_source_option_names_valid_ones(tmp_path, capsys):
    f = tmp_path / "e.csv"
    f.write_text("user,item,timestamp\n1,2,3\n")
    assert main(["data", "prepare", "csv", "--input", str(f), "--out", str(tmp_path / "o"), "--option", "usr_col=u"]) == 2
    err = capsys.readouterr().err
    assert "usr_col" in err and "user_col" in err


def test_filter_that_empties_names_itself(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--users", "20", "--items", "30", "--no-images",
                 "--user-core", "100000"]) == 2
    assert "user_core=100000" in capsys.readouterr().err
    assert not any(Path(tmp_path).iterdir())
