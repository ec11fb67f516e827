"""Which norm classes of an installed library `fastnorm.convert` recognizes, and why it leaves the
others alone.

For each module of the library (transformers: every `transformers.models.*.modeling_*`; timm:
`timm.layers` and `timm.models`; diffusers: `diffusers.models`) the script imports it, takes the
classes defined there whose name matches `--pattern` (default: ending in "RMSNorm"; "Norm" for
every norm-like class), and asks fastnorm's recognizer which family each class's forward is
(fastnorm/_forms.py) or why it is none. It then tries to build one instance (with the size as
the first argument and the library's defaults otherwise) and convert it, which adds the
per-instance checks and the numerical probe. Modules that fail to import (a missing optional
dependency) are counted and named, not fatal.

    python benchmarks/convert_coverage.py [--library transformers|timm|diffusers]
        [--pattern REGEX] [--json PATH]

Prints a summary (classes per family, left alone per reason) and one line per class.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import pkgutil
import re
import sys
import warnings
from typing import Any, Optional

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's fastnorm

import fastnorm  # noqa: E402

fconvert = importlib.import_module("fastnorm.convert")  # (fastnorm.convert is the function)

_PACKAGES = {"transformers": ("transformers.models", r"\.modeling_[a-z0-9_]+$"),
             "timm": ("timm", r"^timm\.(layers|models)\.[a-z0-9_]+$"),
             "diffusers": ("diffusers.models", r"^diffusers\.models\..*$")}


def _modules(library: str) -> tuple[list[Any], dict[str, str]]:
    """The library's modules to scan, and those that failed to import (name -> error)."""
    root_name, name_pattern = _PACKAGES[library]
    root = importlib.import_module(root_name)
    names = sorted(info.name for info in pkgutil.walk_packages(root.__path__, root_name + ".")
                   if re.search(name_pattern, info.name))
    loaded, failed = [], {}
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded.append(importlib.import_module(name))
        except Exception as exc:  # noqa: BLE001 - an optional dependency missing: counted
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return loaded, failed


def _instance(cls: type) -> Optional[nn.Module]:
    """One instance built with the size (32) as the first argument, or None."""
    for args in ((32,), ()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls(*args)
        except Exception:  # noqa: BLE001 - constructors differ; None says it could not be built
            continue
    return None


def scan(library: str, pattern: str) -> dict[str, Any]:
    modules, failed = _modules(library)
    rows = []
    seen: set[type] = set()
    for module in modules:
        for name, cls in vars(module).items():
            if (not isinstance(cls, type) or not issubclass(cls, nn.Module) or cls in seen
                    or cls.__module__ != module.__name__ or not re.search(pattern, name)):
                continue
            seen.add(cls)
            match = fconvert._class_match(cls)
            row = {"class": f"{cls.__module__}.{cls.__qualname__}"}
            if isinstance(match, str):
                base = fconvert._torch_base(cls)
                if base is not None and getattr(cls, "forward", None) is base.forward:
                    row["family"] = f"torch subclass ({base.__name__})"
                else:
                    row["left_alone"] = match
            else:
                row["family"] = match.form.family
                instance = _instance(cls)
                if instance is None:
                    row["instance"] = "not built (constructor needs other arguments)"
                else:
                    fastnorm.convert(instance)
                    report = fastnorm.convert_report(instance)
                    row["instance"] = ("converted" if report.converted else
                                       "left alone: " + report.left_alone[0][2])
            rows.append(row)
    return {"library": library, "version": importlib.import_module(library).__version__,
            "torch": torch.__version__, "pattern": pattern, "classes": rows,
            "import_failures": failed}


def _reason_kind(reason: str) -> str:
    return re.split(r"[;(:]", reason)[0].strip()


def summary(result: dict[str, Any]) -> str:
    rows = result["classes"]
    families = collections.Counter(r["family"] for r in rows if "family" in r)
    alone = collections.Counter(_reason_kind(r["left_alone"]) for r in rows if "left_alone" in r)
    instances = collections.Counter(r.get("instance", "").split(":")[0] for r in rows
                                    if "instance" in r)
    lines = [f"{result['library']} {result['version']} (torch {result['torch']}): "
             f"{len(rows)} classes matching {result['pattern']!r}; "
             f"{len(result['import_failures'])} modules failed to import",
             "recognized, by family:"]
    lines += [f"  {n:4d}  {family}" for family, n in families.most_common()]
    lines += ["one instance each, built and converted:"]
    lines += [f"  {n:4d}  {what}" for what, n in instances.most_common()]
    lines += ["left alone, by reason:"]
    lines += [f"  {n:4d}  {why}" for why, n in alone.most_common()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="transformers", choices=sorted(_PACKAGES))
    p.add_argument("--pattern", default=r"RMSNorm$",
                   help="regular expression on class names (default: RMSNorm$)")
    p.add_argument("--json", help="also write the per-class results here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = scan(args.library, args.pattern)
    print(summary(result))
    for row in result["classes"]:
        what = row.get("family") or "left alone: " + row["left_alone"]
        extra = f" [{row['instance']}]" if "instance" in row else ""
        print(f"{row['class']}: {what}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
