"""Writes fastnorm/_auto_table.json, the table backend "auto" routes by, from benchmark results
measured on a GPU with both fastnorm providers (fastnorm-triton and fastnorm-cuda).

    python benchmarks/write_auto_table.py results/layer_norm.json results/group_norm.json ...

For every (op, dtype, layout, size bucket) both providers were timed in, the faster one becomes
the entry (the key format is fastnorm.ops._router.case_key's): the "fwd" mode decides the
forward op, the "bwd" mode (or, where a bench has none, fwdbwd minus fwd) the backward op.
A bucket measured at several shapes goes to CUDA C++ only where it won at all of them. The
card, date and versions of the results are recorded; results from a CPU are refused (the
interpreter's times say nothing about the GPU kernels).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Iterable, Optional

TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastnorm",
                     "_auto_table.json")
PROVIDERS = {"fastnorm-triton": "triton", "fastnorm-cuda": "cuda"}
LAYOUTS = {"": "rows", "NCHW": "cf", "NCL": "cf", "NHWC": "cl", "NLC": "cl"}
# Each bench op -> (forward op, backward op) of the router.
OPS = {"layer_norm": ("layer_norm_fwd", "layer_norm_bwd"),
       "rms_norm": ("rms_norm_fwd", "rms_norm_bwd"),
       "group_norm": ("group_norm_fwd", "group_norm_bwd"),
       "batch_norm": ("batch_norm_fwd", "batch_norm_bwd")}


def _bucket(op: str, case: str) -> int:
    shape = [int(s) for s in case.split()[0].split("x")]
    if op in ("layer_norm", "rms_norm"):
        size = shape[-1]
    elif op == "group_norm":
        size = math.prod(shape[1:])
    else:
        size = shape[0] * math.prod(shape[2:])
    return 1 << max(0, size - 1).bit_length()


def _layout(layout: str) -> Optional[str]:
    return LAYOUTS.get(layout)


def entries_from_results(rows: Iterable[dict]) -> dict[str, str]:
    """{router case key: "triton" | "cuda"} from result rows (the harness's JSON rows)."""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["provider"] not in PROVIDERS or r["op"] not in OPS or r["ms"] is None \
                or _layout(r["layout"]) is None:
            continue
        key = (r["op"], r["case"], r["dtype"], r["layout"])
        times.setdefault(key, {})[(r["provider"], r["mode"])] = r["ms"]
    verdicts: dict[str, set[str]] = {}
    for (op, case, dtype, layout), t in times.items():
        fwd_op, bwd_op = OPS[op]
        per_set = {}
        for provider, name in PROVIDERS.items():
            fwd = t.get((provider, "fwd"))
            bwd = t.get((provider, "bwd"))
            if bwd is None and fwd is not None and (provider, "fwdbwd") in t:
                bwd = t[(provider, "fwdbwd")] - fwd
            per_set[name] = (fwd, bwd)
        suffix = f":{dtype.replace('torch.', '')}:{_layout(layout)}:{_bucket(op, case)}"
        for index, router_op in ((0, fwd_op), (1, bwd_op)):
            triton_ms, cuda_ms = per_set["triton"][index], per_set["cuda"][index]
            if triton_ms is None or cuda_ms is None:
                continue
            verdicts.setdefault(router_op + suffix, set()).add(
                "cuda" if cuda_ms < triton_ms else "triton")
    return {key: ("cuda" if won == {"cuda"} else "triton")
            for key, won in sorted(verdicts.items())}


def build_table(result_files: list[str]) -> dict:
    rows, metas = [], []
    for path in result_files:
        with open(path) as f:
            data = json.load(f)
        # bench_models.py's and bench_overhead.py's results sit next to the harness's (a glob
        # over the folder passes them too): only bench_<op>.py files record the copy bandwidth.
        if "results" not in data or "copy_gbs" not in data.get("meta", {}):
            print(f"write_auto_table: skipped {path} (not a bench_<op>.py result)")
            continue
        metas.append(data["meta"])
        rows.extend(data["results"])
    if not metas:
        raise SystemExit("write_auto_table: no bench_<op>.py results among "
                         f"{len(result_files)} file(s)")
    cards = {m["device"] for m in metas}
    if len(cards) != 1 or next(iter(cards)).startswith("CPU"):
        raise SystemExit(f"write_auto_table: results must come from one GPU, got {sorted(cards)}")
    with open(TABLE) as f:
        about = json.load(f)["about"]
    return {"about": about, "card": cards.pop(), "date": max(m["date"] for m in metas),
            "versions": {k: metas[0].get(k) for k in ("torch", "triton", "cuda")},
            "entries": entries_from_results(rows)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="benchmark JSON files (bench_<op>.py --out)")
    p.add_argument("--out", default=TABLE)
    args = p.parse_args(argv)
    table = build_table(args.results)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    print(f"{len(table['entries'])} entries, "
          f"{sum(v == 'cuda' for v in table['entries'].values())} to CUDA C++ -> {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
