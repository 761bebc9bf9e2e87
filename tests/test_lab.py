"""The lab: the output contract of a tiny end-to-end run (rendered in a real browser),
resuming after a SIGKILL, and every verdict rule on synthetic records."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from addnorm import lab
from addnorm.lab import claims as C
from addnorm.lab.data import CharData
from addnorm.lab.store import RunStore

VERDICTS = {"holds", "does not hold", "inconclusive"}


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
            f"from addnorm import lab; lab.run({str(tmp_path)!r}, 'quick', claims=[7])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert len(RunStore(tmp_path).records()) == 1
    results = lab.run(tmp_path, "quick", claims=[7])
    keys = [r["key"] for r in RunStore(tmp_path).records()]
    assert sorted(keys) == sorted(c["key"] for c in lab.plan([7], "quick", 2)[7]) and len(set(keys)) == 2
    assert results[0]["verdict"] == "holds"
    written = json.loads((tmp_path / "claims.json").read_text())
    assert written[0]["rule"] == C.CLAIMS[7].rule and (tmp_path / "report.html").stat().st_size > 500
    lab.run(tmp_path, "quick", claims=[7])  # all recorded: nothing runs again
    assert len(RunStore(tmp_path).records()) == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _rendered(report) -> dict:
    """What headless Chromium sees of ``report``: a page beside it loads it in a frame
    and writes what it found into its own DOM, which Chromium dumps."""
    probe = report.parent / "probe.html"
    probe.write_text(
        f'<!doctype html><html><body><iframe id="f" src="{report.name}"></iframe><pre id="out">pending</pre><script>'
        "document.getElementById('f').addEventListener('load', () => {"
        " const d = document.getElementById('f').contentDocument; const imgs = [...d.images];"
        " document.getElementById('out').textContent = JSON.stringify({images: imgs.length,"
        "  loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,"
        "  rows: d.querySelectorAll('#claims tr').length, sections: d.querySelectorAll('section').length});"
        "});</script></body></html>")
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="out">([^<]*)</pre>', proc.stdout)
    assert found, proc.stderr[-2000:]
    return json.loads(found.group(1))


def test_a_tiny_lab_keeps_the_output_contract_and_its_report_renders(tmp_path):
    results = lab.run(tmp_path, "tiny")
    planned = {c["key"] for configs in lab.plan(None, "tiny", 1).values() for c in configs}
    records = RunStore(tmp_path).records()
    assert sorted(r["key"] for r in records) == sorted(planned)  # every run once: shared runs too
    assert all({"config", "result", "versions", "seconds"} <= set(r) for r in records)
    written = json.loads((tmp_path / "claims.json").read_text())
    assert written == json.loads(json.dumps(results, default=str))
    assert [c["id"] for c in written] == sorted(C.CLAIMS)
    for entry in written:
        assert {"id", "claim", "verdict", "evidence"} <= set(entry) and entry["verdict"] in VERDICTS
        assert entry["runs"] > 0 and entry["settings"]
        assert (tmp_path / f"claim{entry['id']}.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "report.html").read_text()
    assert 'src="claim' not in page and page.count("data:image/png;base64,") == len(C.CLAIMS)  # self-contained
    if not _chromium():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("no chromium here to render the report (CI installs it)")
    seen = _rendered(tmp_path / "report.html")
    assert seen == {"images": len(C.CLAIMS), "loaded": len(C.CLAIMS), "rows": len(C.CLAIMS) + 1,
                    "sections": len(C.CLAIMS)}


def test_layernorm_is_independent_of_the_batch_and_batchnorm_is_not():
    result = C.independence_check({"seed": 0})
    assert all(v == 0.0 for v in result["layernorm"].values())
    assert all(v > 1e-3 for v in result["batchnorm"].values())


def test_char_data_splits_batches_and_its_unigram_line():
    data = CharData("aab" * 100, train_fraction=0.5)
    assert data.vocab_size == 2 and len(data.splits["val"]) == 150
    x, y = data.batch("train", 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    # train has 100 a's and 50 b's: with add-one counts p(a) = 101/152, p(b) = 51/152
    expected = -(100 * math.log(101 / 152) + 50 * math.log(51 / 152)) / 150
    assert data.unigram_loss("val") == pytest.approx(expected, rel=1e-12)


def test_unknown_claims_and_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="claims must be among"):
        lab.run(tmp_path, claims=[99])
    with pytest.raises(ValueError, match="mode must be one of tiny, quick, full"):
        lab.run(tmp_path, "fast")
    proc = subprocess.run([sys.executable, "-m", "addnorm.cli", "lab", "--claims", "99", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 2 and "claims must be among" in proc.stderr


# ---------------------------------------------------------------------------
# Each verdict rule on synthetic records: a case for each verdict.
# ---------------------------------------------------------------------------


def _lm(placement, depth, lr, seed, failed=False, val=2.0, norm="layernorm", act=None):
    act = act or [1.0, 1.0]
    return {"config": {"norm": norm, "placement": placement, "n_layers": depth, "lr": lr, "seed": seed},
            "result": {"failed": failed, "val_loss": val, "losses": [[0, 4.0], [9, val]], "unigram_loss": 3.2,
                       "act_rms_by_layer": {"0": [1.0] * len(act), "9": act}, "grad_norm_by_layer": {"0": [1.0, 1.0]}}}


def _grid(spec, seeds=3):
    """spec: {(placement, depth): (failed, val)} at lr 1e-3 -> records over seeds."""
    return [_lm(p, d, 1e-3, s, *v) for (p, d), v in spec.items() for s in range(seeds)]


def _verdict(claim, records):
    verdict, evidence = C.CLAIMS[claim].verdict(records)
    assert evidence
    return verdict


def test_claim_2_rule():
    def spec(post_deep_fails, pre_fails=False):
        return _grid({("post", 2): (False, 2.0), ("pre", 2): (pre_fails, 2.0),
                      ("post", 12): (post_deep_fails, 2.0), ("pre", 12): (pre_fails, 2.0)})

    assert _verdict(2, spec(True)) == "holds"
    assert _verdict(2, spec(False)) == "inconclusive"  # nothing failed: the grid did not reach instability
    assert _verdict(2, spec(False, pre_fails=True)) == "does not hold"


def test_claim_3_rule():
    def spec(deep_fails, shallow_val=2.0):
        return _grid({("post", 2): (False, 2.0), ("deepnorm", 2): (False, shallow_val),
                      ("post", 12): (True, 3.2), ("deepnorm", 12): (deep_fails, 2.1)})

    assert _verdict(3, spec(False)) == "holds"
    assert _verdict(3, spec(True)) == "does not hold"  # DeepNorm fails where Post-LN does
    assert _verdict(3, spec(False, shallow_val=2.2)) == "does not hold"  # 10% worse where both train
    never = _grid({("post", 2): (False, 2.0), ("deepnorm", 2): (False, 2.0)})
    assert _verdict(3, never) == "inconclusive"  # Post-LN never failed
    sometimes = spec(False)
    sometimes[-3]["result"]["failed"] = True  # DeepNorm at 12 layers fails in 1 of 3 seeds, Post-LN in 3
    assert _verdict(3, sometimes) == "inconclusive"


def test_claim_4_rule():
    def records(post_vals, pre_vals):
        return [_lm("post", 6, 1e-3, s, False, v) for s, v in enumerate(post_vals)] + \
               [_lm("pre", 6, 1e-3, s, False, v) for s, v in enumerate(pre_vals)]

    assert _verdict(4, records([1.9, 1.9], [2.0, 2.0])) == "holds"
    assert _verdict(4, records([2.1, 2.1], [2.0, 2.0])) == "does not hold"
    assert _verdict(4, records([1.9, 2.1], [2.0, 2.0])) == "inconclusive"  # mixed
    failed = [_lm("post", 6, 1e-3, 0, True, 3.2), _lm("pre", 6, 1e-3, 0, False, 2.0)]
    assert _verdict(4, failed) == "inconclusive"  # no setting where both train


def test_claim_5_rule():
    def records(pre_act, sandwich_act, sandwich_fails):
        return [_lm("pre", 6, 1e-3, 0, act=pre_act), _lm("sandwich", 6, 1e-3, 0, act=sandwich_act),
                _lm("pre", 6, 3e-3, 0), _lm("sandwich", 6, 3e-3, 0, failed=sandwich_fails)]

    assert _verdict(5, records([1, 2, 4], [1, 1.2, 1.5], True)) == "holds"
    assert _verdict(5, records([1, 2, 4], [1, 3, 5], True)) == "does not hold"
    assert _verdict(5, records([1, 2, 4], [1, 1.2, 1.5], False)) == "inconclusive"  # bounded, never failed


def test_claim_1_rule():
    def records(savings):
        out = [{"config": {"kind": "norm_cost", "backend": b, "shape": [64, 128], "dtype": "float32"},
                "result": {p: {"saving": s} for p in ("fwd", "fwd+bwd")}} for b, s in savings.items()]
        return out + [{"config": {"kind": "train_step_cost"}, "result": {"saving": savings["addnorm"]}}]

    assert _verdict(1, records({"torch": 0.3, "torch.compile": 0.1, "addnorm": 0.2})) == "holds"
    assert _verdict(1, records({"torch": -0.3, "torch.compile": 0.0, "addnorm": 0.05})) == "does not hold"
    assert _verdict(1, records({"torch": -0.3, "torch.compile": 0.1, "addnorm": 0.2})) == "inconclusive"


def test_claim_6_rule():
    def records(errors):  # {norm: (error at batch 2, at batch 32)}
        return [{"config": {"norm": n, "batch": b}, "result": {"test_error": e[i]}}
                for n, e in errors.items() for i, b in enumerate((2, 32))]

    assert _verdict(6, records({"batchnorm": (0.08, 0.02), "layernorm": (0.03, 0.03),
                                "groupnorm": (0.02, 0.02)})) == "holds"
    assert _verdict(6, records({"batchnorm": (0.025, 0.02), "layernorm": (0.03, 0.03),
                                "groupnorm": (0.02, 0.02)})) == "does not hold"
    assert _verdict(6, records({"batchnorm": (0.035, 0.02), "layernorm": (0.03, 0.03),
                                "groupnorm": (0.02, 0.02)})) == "inconclusive"  # 1.5 points


def test_claim_7_rule():
    def records(ln, bn):
        return [{"result": {"layernorm": {"a": ln}, "batchnorm": {"a": bn}}}]

    assert _verdict(7, records(0.0, 0.5)) == "holds"
    assert _verdict(7, records(1e-3, 0.5)) == "does not hold"
    assert _verdict(7, records(1e-7, 0.5)) == "inconclusive"


def test_claim_8_rule():
    def records(diff, speedups):
        return [{"config": {"seed": s}, "result": {"folded": 9, "batch_norms": 9, "max_rel_diff": diff,
                                                   "unfolded_ms": 10.0 * v, "folded_ms": 10.0}}
                for s, v in enumerate(speedups)]

    assert _verdict(8, records(1e-7, [1.2, 1.1])) == "holds"
    assert _verdict(8, records(1e-3, [1.2, 1.1])) == "does not hold"
    assert _verdict(8, records(1e-7, [1.2, 0.9])) == "inconclusive"


def test_claim_9_rule():
    def records(bn_vals, bn_failed=False):
        return ([_lm("pre", 2, 1e-3, s, False, 2.0) for s in range(2)]
                + [_lm("pre", 2, 1e-3, s, bn_failed, v, norm="batchnorm") for s, v in enumerate(bn_vals)])

    assert _verdict(9, records([2.2, 2.3])) == "holds"
    assert _verdict(9, records([1.9, 1.9], bn_failed=True)) == "holds"  # fails more often
    assert _verdict(9, records([1.9, 1.8])) == "does not hold"
    assert _verdict(9, records([1.9, 2.1])) == "inconclusive"


def test_claim_10_rule():
    def records(torch_speedups, ours):
        return [{"config": {"backend": b}, "result": {"speedup": s}}
                for b, values in (("torch", torch_speedups), ("addnorm", ours)) for s in values]

    assert _verdict(10, records([1.3, 1.2, 0.9], [1.5, 1.1, 1.2])) == "holds"
    assert _verdict(10, records([0.8, 0.9, 0.7], [0.9, 0.95, 1.2])) == "does not hold"
    assert _verdict(10, records([1.3, 1.2, 1.1], [0.9, 0.95, 0.8])) == "inconclusive"
