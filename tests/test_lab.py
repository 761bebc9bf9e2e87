"""The lab's machinery: resumable records, verdict rules, the report (no long training)."""

import json
import os
import subprocess
import sys

import pytest

from addnorm import lab
from addnorm.lab.claims import CLAIMS, _depth_verdict, independence_check
from addnorm.lab.data import CharData
from addnorm.lab.store import RunStore


def test_store_survives_a_cut_line_and_never_duplicates(tmp_path):
    store = RunStore(tmp_path)
    store.append({"key": "a", "x": 1})
    with open(store.path, "ab") as f:
        f.write(b'{"key": "b", "x"')  # a kill in the middle of a write
    assert store.done() == {"a"}
    store.append({"key": "b", "x": 2})
    assert [r["key"] for r in store.records()] == ["a", "b"]


def test_a_killed_lab_resumes_where_it_stopped(tmp_path):
    """SIGKILL after the first record: the second start runs only what is missing."""
    code = ("import os, signal, addnorm.lab.store as s\n"
            "real = s.RunStore.append\n"
            "def append(self, r):\n    real(self, r); os.kill(os.getpid(), signal.SIGKILL)\n"
            "s.RunStore.append = append\n"
            f"from addnorm import lab; lab.run({str(tmp_path)!r}, quick=True, claims=[7])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert len(RunStore(tmp_path).records()) == 1
    results = lab.run(tmp_path, quick=True, claims=[7])
    keys = [r["key"] for r in RunStore(tmp_path).records()]
    assert sorted(keys) == ["c7-s0", "c7-s1"]
    assert results[0]["verdict"] == "holds"
    written = json.loads((tmp_path / "claims.json").read_text())
    assert written[0]["rule"] == CLAIMS[7].rule and (tmp_path / "report.html").stat().st_size > 500


def test_layernorm_is_independent_of_the_batch_and_batchnorm_is_not():
    result = independence_check({"seed": 0})
    assert all(v == 0.0 for v in result["layernorm"].values())
    assert all(v > 1e-3 for v in result["batchnorm"].values())


def _rec(placement, depth, lr, seed, diverged):
    return {"config": {"placement": placement, "n_layers": depth, "lr": lr, "seed": seed},
            "result": {"diverged": diverged}}


def test_depth_verdict_follows_its_rule():
    def records(post_deep_fails, pre_fails=False):
        out = []
        for seed in range(3):
            out += [_rec("post", 2, 1e-3, seed, False), _rec("pre", 2, 1e-3, seed, pre_fails),
                    _rec("post", 12, 1e-3, seed, post_deep_fails), _rec("pre", 12, 1e-3, seed, pre_fails)]
        return out

    assert _depth_verdict(records(True))[0] == "holds"
    assert _depth_verdict(records(False))[0] == "inconclusive"  # nothing failed
    assert _depth_verdict(records(False, pre_fails=True))[0] == "does not hold"


def test_char_data_splits_and_batches():
    import torch

    data = CharData("abcdefghij" * 50, train_fraction=0.8)
    assert data.vocab_size == 10 and len(data.splits["val"]) == 100
    x, y = data.batch("train", 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])


def test_unknown_claims_are_refused(tmp_path):
    with pytest.raises(ValueError, match="claims must be among"):
        lab.run(tmp_path, claims=[99])
    proc = subprocess.run([sys.executable, "-m", "addnorm.cli", "lab", "--claims", "99", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 2 and "claims must be among" in proc.stderr
