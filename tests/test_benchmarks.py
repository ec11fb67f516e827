"""The benchmark scripts run end to end (torch provider only, to stay fast on CPU) and write the
CSV/JSON the GPU check collects; the plot script draws from that JSON."""
import glob
import importlib.util
import json
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Not bandwidth benchmarks, so outside the harness, each with its own smoke test:
# bench_overhead.py (host overhead; test_semantics.py) and bench_train.py (steps/s of the
# trainer; test_train_bench.py).
_NOT_HARNESS = ("bench_overhead.py", "bench_train.py")
_HARNESS_BENCHES = sorted(p for p in glob.glob(os.path.join(BENCH_DIR, "bench_*.py"))
                          if os.path.basename(p) not in _NOT_HARNESS)


@pytest.mark.parametrize("path", _HARNESS_BENCHES, ids=os.path.basename)
def test_bench_script_writes_results(path, tmp_path):
    name = os.path.basename(path)[len("bench_"):-3]
    _load(path).main(["--quick", "--providers", "torch", "--out", str(tmp_path)])
    with open(tmp_path / f"{name}.json") as f:
        data = json.load(f)
    assert data["meta"]["copy_gbs"] > 0 and data["meta"]["torch"]
    rows = data["results"]
    assert rows and all(r["provider"] == "torch" for r in rows)
    assert all(r["gbs"] > 0 and not r["error"] for r in rows), [r["error"] for r in rows]
    assert (tmp_path / f"{name}.csv").read_text().startswith("op,case,mode,provider")
    pngs = _load(os.path.join(BENCH_DIR, "plot.py")).plot(str(tmp_path / f"{name}.json"),
                                                          str(tmp_path))
    assert pngs and all(os.path.getsize(p) > 0 for p in pngs)


def test_time_budget_records_skipped_cases(tmp_path):
    _load(os.path.join(BENCH_DIR, "bench_layer_norm.py")).main(
        ["--quick", "--providers", "torch", "--max-seconds", "0", "--out", str(tmp_path)])
    with open(tmp_path / "layer_norm.json") as f:
        rows = json.load(f)["results"]
    assert rows and all(r["gbs"] is None and r["error"].startswith("skipped") for r in rows)
