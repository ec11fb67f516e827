"""benchmarks/bench_models.py: training steps of real models, torch's norms vs fastnorm.convert.

The script runs end to end on its tiny models (on a CPU: fastnorm's reference op layer, no
compile) and writes one table row per model; its gradient check means something: fastnorm's
Triton kernels (the interpreter on a CPU) give gradients as close to a float64 run as torch's
own, and a norm computing the wrong thing is caught. A missing library or a failing compile
becomes a row's text, not a crash."""
import glob
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

import fastnorm

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "bench_models.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_models", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bm = _load()


def _within_factor(fastnorm_err: float, torch_err: float) -> bool:
    """fastnorm's gradient error vs float64 is at most 10x torch's, plus a small atol (the
    rounding of a few fp32 operations) for models where torch's error is tiny."""
    return fastnorm_err <= 10 * torch_err + 1e-6


def _results(out_dir) -> tuple[dict, dict[str, dict], str]:
    (json_path,) = glob.glob(os.path.join(out_dir, "models-*.json"))
    with open(json_path) as f:
        data = json.load(f)
    with open(json_path[:-len(".json")] + ".md") as f:
        md = f.read()
    return data["meta"], {r["model"]: r for r in data["results"]}, md


def _skipped(name: str) -> str:
    """The reason a model's library is missing here ("" when it is installed)."""
    case = bm._CASES[name](True)
    return case if isinstance(case, str) else ""


def test_every_model_runs_and_writes_its_row(tmp_path):
    assert bm.main(["--tiny", "--no-compile", "--steps", "2", "--warmup", "1",
                    "--out", str(tmp_path)]) == 0
    meta, rows, md = _results(tmp_path)
    assert meta["torch"] and meta["device"] and meta["date"] and meta["tiny"]
    assert meta["backend"] == ("auto" if torch.cuda.is_available() else "reference")
    assert list(rows) == list(bm.MODELS)
    for name, r in rows.items():
        if _skipped(name):  # timm where it is not installed: the row says so
            assert r["error"] == _skipped(name) and r["error"].startswith("skipped: ")
            assert f"| {name} | {r['error']} |" in md
            continue
        assert not r["error"], (name, r["error"])
        assert r["converted"] > 0, (name, r)
        assert r["left_alone"] == 0 and not r["left_alone_why"], (name, r)
        assert r["eager_torch_ms"] > 0 and r["eager_fastnorm_ms"] > 0
        assert r["eager_speedup"] == pytest.approx(r["eager_torch_ms"] / r["eager_fastnorm_ms"])
        assert r["compiled_torch_ms"] is None and not r["compile_error"]
        errs = r["grad_err_torch"], r["grad_err_fastnorm"]
        assert all(math.isfinite(e) and 0 < e < 1e-2 for e in errs), (name, errs)
        assert _within_factor(r["grad_err_fastnorm"], r["grad_err_torch"]), (name, errs)
        assert r["grad_params"] > 0 and r["check_batch"] == r["batch"]
        assert sum(line.startswith(f"| {name} | {r['converted']} | {r['left_alone']} |")
                   for line in md.splitlines()) == 1, md


@pytest.mark.parametrize("name", bm.MODELS)
def test_gradient_check_with_fastnorm_triton_kernels(name, device):
    case = bm._CASES[name](True)
    if isinstance(case, str):
        pytest.skip(case)   # timm where it is not installed
    batch = case.make_batch(case.batch, torch.Generator().manual_seed(1))
    err_torch, err_fastnorm, params = bm.grad_errors(case, bm.build_model(case, device), batch,
                                                     device, "triton")
    assert params > 0 and math.isfinite(err_fastnorm) and err_torch > 0
    assert _within_factor(err_fastnorm, err_torch), (err_fastnorm, err_torch)


def test_float64_reference_computes_the_language_models_norms_in_float64():
    # transformers' RMSNorms compute float64 input in fp32; the reference must not
    case = bm._CASES["gemma"](True)
    model = bm.build_model(case, torch.device("cpu")).double()
    bm._exact_float64(model)
    norm = next(m for m in model.modules() if type(m).__name__ == "GemmaRMSNorm")
    x = torch.randn(3, norm.weight.shape[0], dtype=torch.float64)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight)
    torch.testing.assert_close(norm(x), want, atol=1e-15, rtol=1e-15)


def test_gradient_check_catches_a_wrong_norm(monkeypatch, device):
    convert = fastnorm.convert

    def convert_with_wrong_eps(model):
        convert(model)
        for module in model.modules():
            if isinstance(module, fastnorm.nn.GroupNorm):
                module.eps = 1.0   # still a GroupNorm, computing something else
        return model
    monkeypatch.setattr(fastnorm, "convert", convert_with_wrong_eps)
    case = bm._CASES["gn_stack"](True)
    batch = case.make_batch(case.batch, torch.Generator().manual_seed(1))
    err_torch, err_fastnorm, _ = bm.grad_errors(case, bm.build_model(case, device), batch,
                                                device, "reference")
    assert not _within_factor(err_fastnorm, err_torch), (err_fastnorm, err_torch)


def test_missing_library_skips_the_model(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transformers", "timm")
                        else find_spec(name, *a))
    assert bm.main(["--tiny", "--models", "llama,vit,convnext", "--out", str(tmp_path)]) == 0
    _, rows, md = _results(tmp_path)
    assert [r["error"] for r in rows.values()] == ["skipped: transformers is not installed"] * 2 \
        + ["skipped: timm is not installed"]
    assert "| llama | skipped: transformers is not installed |" in md


def test_compile_failure_is_recorded_in_the_row(monkeypatch, tmp_path):
    def compile_failing_for_fastnorm(model, *args, **kwargs):
        if not fastnorm.convert_report(model).converted:
            return model   # torch's side: "compiled" is the eager model here

        def broken(*args, **kwargs):
            raise RuntimeError("inductor failed\nsecond line")
        return broken
    monkeypatch.setattr(torch, "compile", compile_failing_for_fastnorm)
    assert bm.main(["--tiny", "--models", "gn_stack", "--compile", "--steps", "1", "--warmup",
                    "1", "--check-batch", "-1", "--out", str(tmp_path)]) == 0
    _, rows, md = _results(tmp_path)
    row = rows["gn_stack"]
    assert not row["error"] and row["eager_fastnorm_ms"] > 0
    assert row["compiled_torch_ms"] > 0 and row["compiled_fastnorm_ms"] is None
    assert row["compile_error"] == "fastnorm: RuntimeError: inductor failed"
    assert row["grad_err_torch"] is None and row["check_batch"] == 0
    assert "| error | - |" in md
