"""`python -m megamoe.parallel`: the table, the JSON, and errors on invalid sizes."""

import json
import subprocess
import sys

from megamoe.parallel.__main__ import main


def test_json_output(capsys):
    assert main(["--world-size", "16", "--tp", "2", "--cp", "2", "--pp", "2", "--ep", "4", "--etp", "1",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"groups", "dp", "edp"} and d["dp"] == 2 and d["edp"] == 2
    assert d["groups"]["pp"][0] == [0, 8] and d["groups"]["ep"][1] == [4, 5, 6, 7]


def test_table_output(capsys):
    assert main(["--world-size", "8", "--tensor-model-parallel-size", "2", "--pp", "2", "--vpp", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("rank"))
    assert header.split() == ["rank", "tp", "cp", "dp", "pp", "|", "etp", "ep", "edp", "|", "stage", "chunks"]
    # rank 5: tp 1, dp 2, pp 1 (stride of pp is tp*cp*dp = 4); model chunks 1 and 3
    row5 = next(line.split() for line in lines if line.split()[:1] == ["5"])
    assert row5 == ["5", "1", "0", "0", "1", "|", "1", "0", "0", "|", "1", "1,3"]
    assert "  tp_ep_pp" in out and "groups:" in out


def test_invalid_sizes_exit_2_with_reason(capsys):
    assert main(["--world-size", "6", "--tp", "4"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "megamoe.parallel", "--world-size", "8", "--tp", "2", "--ep", "4",
                          "--etp", "1", "--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["groups"]["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
