"""Bar charts of effective bandwidth from the JSON files the bench_<op>.py scripts write.

    python benchmarks/plot.py bench_results/layer_norm.json [more.json ...] --out bench_results
One PNG per (json, mode): GB/s per case and provider, with the measured copy bandwidth as a line.
"""
from __future__ import annotations

import argparse
import json
import os


def plot(path: str, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["results"]
    written = []
    for mode in sorted({r["mode"] for r in rows}):
        sel = [r for r in rows if r["mode"] == mode and r["gbs"]]
        if not sel:
            continue
        cases = list(dict.fromkeys(f"{r['op']} {r['case']} {r['dtype']} {r['layout']}".strip()
                                   for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4.5))
        for i, p in enumerate(providers):
            values = []
            for c in cases:
                match = [r["gbs"] for r in sel if r["provider"] == p and
                         f"{r['op']} {r['case']} {r['dtype']} {r['layout']}".strip() == c]
                values.append(match[0] if match else 0)
            ax.bar([k + i * width for k in range(len(cases))], values, width, label=p)
        ax.axhline(meta["copy_gbs"], color="k", linestyle="--", linewidth=1, label="copy bandwidth")
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("effective GB/s")
        ax.set_title(f"{os.path.basename(path)} {mode} — {meta['device']}, {meta['date'][:10]}",
                     fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(path))[0]}_{mode}.png")
        fig.savefig(png, dpi=120)
        plt.close(fig)
        written.append(png)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: next to each json)")
    args = p.parse_args(argv)
    for path in args.json:
        for png in plot(path, args.out or os.path.dirname(os.path.abspath(path))):
            print("wrote", png)


if __name__ == "__main__":
    main()
