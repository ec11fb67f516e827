"""The benchmark scripts run end to end (torch and the fastnorm providers, interpreted on CPU at
the --quick shapes) and write the CSV/JSON the GPU check collects; the plot script draws from
that JSON; the auto-table writer turns GPU results into router entries."""
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
# bench_overhead.py (host cost per call; test_host_path.py), bench_train.py (steps/s of the
# trainer; test_train_bench.py) and bench_models.py (training steps of real models;
# test_bench_models.py).
_NOT_HARNESS = ("bench_overhead.py", "bench_train.py", "bench_models.py")
PROVIDERS = ("torch", "fastnorm-triton", "fastnorm-cuda", "fastnorm-syncbn-chain",
             "fastnorm-triton-gns")
_HARNESS_BENCHES = sorted(p for p in glob.glob(os.path.join(BENCH_DIR, "bench_*.py"))
                          if os.path.basename(p) not in _NOT_HARNESS)


@pytest.mark.parametrize("path", _HARNESS_BENCHES, ids=os.path.basename)
def test_bench_script_writes_results(path, tmp_path, device):
    # (`device`: the harness runs on the suite's device, CUDA where present)
    name = os.path.basename(path)[len("bench_"):-3]
    _load(path).main(["--quick", "--providers", ",".join(PROVIDERS), "--out", str(tmp_path)])
    with open(tmp_path / f"{name}.json") as f:
        data = json.load(f)
    assert data["meta"]["copy_gbs"] > 0 and data["meta"]["torch"]
    rows = data["results"]
    ran = {r["provider"] for r in rows}
    assert "torch" in ran and "fastnorm-triton" in ran and ran <= set(PROVIDERS), ran
    assert all(r["gbs"] > 0 and not r["error"] for r in rows), [r["error"] for r in rows]
    # Kernel-only times (CUDA-graph replay, profiled kernel sum): CUDA only; a failed capture
    # says why.
    import torch

    for r in rows:
        if torch.cuda.is_available():
            assert r["graph_ms"] or r["graph_error"], r
            assert r["kernel_ms"] > 0, r
        else:
            assert (r["graph_ms"], r["graph_pct_copy"], r["kernel_ms"]) == (None, None, None), r
    assert (tmp_path / f"{name}.csv").read_text().startswith("op,case,mode,provider")
    pngs = _load(os.path.join(BENCH_DIR, "plot.py")).plot(str(tmp_path / f"{name}.json"),
                                                          str(tmp_path))
    assert pngs and all(os.path.getsize(p) > 0 for p in pngs)


def test_backward_only_reset_runs_the_forward_again():
    """graph_time_ms resets a backward-only closure so that its forward runs on the capture
    stream: after reset() the next call is a forward again, the calls after it backwards."""
    import torch

    import _harness

    x = torch.ones(3, requires_grad=True)
    forwards = []

    def forward():
        forwards.append(1)
        return x * 2
    run = _harness.backward_only(forward, torch.ones(3))
    run()
    run()
    run()
    assert len(forwards) == 1 and x.grad.tolist() == [4.0] * 3
    run.reset()
    x.grad = None
    run()
    assert len(forwards) == 2 and x.grad is None
    run()
    assert x.grad.tolist() == [2.0] * 3


def test_time_budget_records_skipped_cases(tmp_path):
    _load(os.path.join(BENCH_DIR, "bench_layer_norm.py")).main(
        ["--quick", "--providers", "torch", "--max-seconds", "0", "--out", str(tmp_path)])
    with open(tmp_path / "layer_norm.json") as f:
        rows = json.load(f)["results"]
    assert rows and all(r["gbs"] is None and r["error"].startswith("skipped") for r in rows)


def test_auto_table_writer_picks_the_faster_kernel_set(tmp_path):
    writer = _load(os.path.join(BENCH_DIR, "write_auto_table.py"))

    def row(provider, mode, ms, case="64x65536", op="layer_norm", layout=""):
        return dict(op=op, case=case, mode=mode, provider=provider, dtype="bfloat16",
                    layout=layout, ms=ms)

    rows = [row("fastnorm-triton", "fwd", 2.0), row("fastnorm-cuda", "fwd", 1.0),
            row("fastnorm-triton", "fwdbwd", 5.0), row("fastnorm-cuda", "fwdbwd", 5.5),
            row("torch", "fwd", 0.5),  # another provider never enters the table
            row("fastnorm-triton", "fwd", 1.0, case="8x6x5x5", op="batch_norm", layout="NHWC"),
            row("fastnorm-cuda", "fwd", 2.0, case="8x6x5x5", op="batch_norm", layout="NHWC")]
    assert writer.entries_from_results(rows) == {
        "layer_norm_fwd:bfloat16:rows:65536": "cuda",
        "layer_norm_bwd:bfloat16:rows:65536": "triton",   # (5.5 - 1) > (5 - 2)
        "batch_norm_fwd:bfloat16:cl:256": "triton"}
    meta = dict(device="CPU (x86_64, 2 cores)", date="2026-12-01T00:00:00+00:00", torch="2",
                triton="3", cuda=None, copy_gbs=20.0)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": meta, "results": rows}))
    with pytest.raises(SystemExit, match="one GPU"):
        writer.build_table([str(path)])

    # gpu_check.sh passes every JSON of its results folder: bench_models.py's and
    # bench_overhead.py's files are skipped, not read as bandwidth results.
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "layer_norm.json").write_text(json.dumps(
        {"meta": dict(meta, device="NVIDIA H200", copy_gbs=4200.0), "results": rows}))
    (gpu / "models-cuda-2026-12-01T000000.json").write_text(json.dumps(
        {"meta": dict(device="NVIDIA H200", date=meta["date"]),
         "results": [dict(model="resnet50", speedup=1.1)]}))
    (gpu / "overhead.json").write_text(json.dumps(
        {"meta": dict(device="NVIDIA H200"), "rows": [], "launch_us": 4.0}))
    table = writer.build_table(sorted(str(p) for p in gpu.iterdir()))
    assert table["card"] == "NVIDIA H200" and table["entries"] == writer.entries_from_results(rows)
    with pytest.raises(SystemExit, match="no bench_<op>.py results"):
        writer.build_table([str(gpu / "overhead.json")])


def test_gpu_check_script_parses_and_names_existing_tests():
    """benchmarks/gpu_check.sh runs once per GPU lease, so a syntax error or a renamed test
    file would cost that lease: bash parses it, and every test file it names exists."""
    import re
    import subprocess

    script = os.path.join(BENCH_DIR, "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    named = re.findall(r"tests/test_\w+\.py", open(script).read())
    root = os.path.dirname(BENCH_DIR)
    assert len(named) > 10 and [t for t in named if not os.path.exists(os.path.join(root, t))] == []
