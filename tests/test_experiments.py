"""Each experiment in benchmarks/experiments/ runs end to end with its --quick (tiny) settings
and writes its markdown table, JSON and PNG plot under --out."""
from __future__ import annotations

import importlib.util
import json
import os

EXP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "benchmarks", "experiments")


def _run(name: str, out: str) -> dict:
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXP_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", out])
    for ext in ("md", "json", "png"):
        assert os.path.getsize(os.path.join(out, f"{name}.{ext}")) > 0, ext
    with open(os.path.join(out, f"{name}.json")) as fh:
        data = json.load(fh)
    assert data["rows"] and data["meta"]["date"] and data["meta"]["machine"]
    table = open(os.path.join(out, f"{name}.md")).read()
    assert table.count("\n|") >= len(data["rows"]) + 1 and f"![{name}]({name}.png)" in table
    return result


def test_adaptive_batch(tmp_path):
    rows = _run("adaptive_batch", str(tmp_path))["rows"]
    assert [r["setting"] for r in rows][:2] == ["adaptive (GNS), B0=32", "fixed B=32"]
    assert all(0 <= r["final test accuracy"] <= 1 for r in rows)


def test_norm_batch(tmp_path):
    rows = _run("norm_batch", str(tmp_path))["rows"]
    assert [r["per-device batch"] for r in rows] == [64, 8, 2]
    # GN and LN do not depend on the per-device batch: one run stands for every row.
    assert len({r["GN accuracy"] for r in rows}) == 1 and len({r["LN accuracy"] for r in rows}) == 1


def test_simclr_leak(tmp_path):
    rows = _run("simclr_leak", str(tmp_path))["rows"]
    for r in rows:
        assert -1 <= r["leak gap (train-eval)"] <= 1
        assert abs(r["leak gap (train-eval)"] - (r["pretext train"] - r["pretext eval"])) < 1e-9
        assert abs(r["leak (same-split)"] - (r["same group"] - r["split groups"])) < 1e-9
        assert 0 < r["kNN acc"] <= 1


def test_rare_class(tmp_path):
    out = _run("rare_class", str(tmp_path))
    var = {(r["parameters"], r["estimator"]): r for r in out["variance"]}
    assert len(var) == 6
    for (when, est), r in var.items():
        assert r["variance"] > 0 and r["bias^2"] >= 0
        if est.startswith("stratified"):
            assert r["batches without the rare class"] == 0
    assert [r["setting"] for r in out["recall"]] == ["random", "stratified + weights",
                                                     "stratified, no weights"]
