"""benchmarks/bench_train.py runs end to end (one process, a few steps) and writes train.json.
(tests/test_benchmarks.py covers the kernel benchmarks on the shared harness; this one is not
on that harness: a training step has no ideal-bytes formula.)"""
import importlib.util
import json
import os

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "bench_train.py")


def test_bench_train_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--procs", "1", "--steps", "20", "--repeats", "1",
                        "--out", str(tmp_path)]) == 0
    with open(tmp_path / "train.json") as fh:
        data = json.load(fh)
    (row,) = data["results"]
    assert row["procs"] == 1 and row["steps_per_s_off"] > 0 and row["steps_per_s_on"] > 0
    assert data["meta"]["date"] and data["meta"]["torch"]
