"""The CUDA C++ kernels (csrc/*.cu) compile, without a GPU and without torch.

Every torch-free translation unit is compiled with nvcc, with the flags torch's extension build
adds, for sm_80 and sm_90 (layer_norm.cu, whose thread-block-cluster path is sm_90-only, also for
sm_90a), keeping the PTX of that compile so cheap properties of the generated code can be
checked: 16-byte vector loads and stores, the cluster barrier and distributed-shared-memory
addressing in the sm_90 builds only, and no atomics anywhere (every reduction is fixed-order).
The launcher header is compiled by the host compiler alone, as csrc/ops.cpp will include it, and
the GPU self-test (csrc/selftest) is linked against the kernels. Skips only when nvcc is absent.
Nothing here runs a kernel: the kernels are unrun until a GPU check executes them.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
INCLUDE = CSRC / "include"
SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))
# sm_90 is what the default TORCH_CUDA_ARCH_LIST ("8.0;9.0") builds; the cluster path needs no
# arch-specific feature, and layer_norm.cu is also built for sm_90a to keep that option open.
ARCHS = ("80", "90")
JOBS = [(s, a) for s in SOURCES for a in ARCHS] + [("layer_norm.cu", "90a")]
# The flags torch.utils.cpp_extension adds to every nvcc call of an extension build (no implicit
# half / bfloat16 conversions or operators): the kernels must compile under them too.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not found")


def _cuda_include() -> Path:
    """The toolkit's include directory (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [Path(NVCC).resolve().parent.parent / "include"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "include")
    for inc in candidates:
        if (inc / "cuda_runtime.h").exists():
            return inc
    pytest.skip("CUDA headers not found next to nvcc")


def _compile(source: str, arch: str, out_dir: str) -> tuple[int, str, str]:
    """nvcc -c for one arch; -keep leaves the PTX of that same compile behind (no second
    front-end pass, and no cuobjdump needed). Returns (rc, log, ptx)."""
    keep = Path(out_dir) / f"{source}.{arch}"
    keep.mkdir()
    cmd = [NVCC, "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, f"-I{INCLUDE}",
           "-c", str(CSRC / source), "-o", str(keep / "out.o"),
           f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Werror", "all-warnings", "-Xptxas=-v", "-keep", "-keep-dir", str(keep)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return proc.returncode, log, ""
    ptx = "".join(p.read_text() for p in sorted(keep.glob("*.ptx")))
    return 0, log, ptx


@functools.lru_cache(maxsize=None)
def _out_dir() -> str:
    path = tempfile.mkdtemp(prefix="fastnorm_nvcc_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def _builds() -> dict[tuple[str, str], tuple[int, str, str]]:
    """All (source, arch) compiles, two at a time (the CI machine has two shared cores)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        # Largest translation unit first, so the two workers finish together.
        jobs = sorted(JOBS, key=lambda job: -(CSRC / job[0]).stat().st_size)
        futures = {job: pool.submit(_compile, job[0], job[1], _out_dir()) for job in jobs}
        return {job: f.result() for job, f in futures.items()}


def test_sources_present():
    assert {"layer_norm.cu", "group_norm.cu", "batch_norm.cu"} <= set(SOURCES)


@pytest.mark.parametrize("source, arch", JOBS)
def test_compiles(source, arch):
    rc, log, ptx = _builds()[(source, arch)]
    assert rc == 0, f"nvcc failed for {source} sm_{arch}:\n{log[-4000:]}"
    assert ".entry" in ptx, "no kernels in the PTX"


@pytest.mark.parametrize("source, arch", JOBS)
def test_vector_loads_and_no_atomics(source, arch):
    rc, log, ptx = _builds()[(source, arch)]
    assert rc == 0, log[-4000:]
    # 16-byte accesses: ld.global(.nc).v4.{u32,f32,b32} / st.global.v4.
    assert re.search(r"ld\.global(\.nc)?(\.L1::\w+)?(\.L2::\w+)?\.v4\.", ptx), \
        "no 128-bit global loads"
    assert re.search(r"st\.global\.v4\.", ptx), "no 128-bit global stores"
    # Deterministic reductions: no atomic or reduction-to-memory instructions.
    assert not re.search(r"\b(atom|red)\.(global|shared)", ptx), "atomics in the generated code"


@pytest.mark.parametrize("arch90", ["90", "90a"])
def test_cluster_path_only_on_sm90(arch90):
    rc90, log90, ptx90 = _builds()[("layer_norm.cu", arch90)]
    rc80, log80, ptx80 = _builds()[("layer_norm.cu", "80")]
    assert rc90 == 0 and rc80 == 0, log90[-2000:] + log80[-2000:]
    cluster_entries = [e for e in re.findall(r"\.entry\s+(\w+)", ptx90) if "cluster" in e]
    assert len(cluster_entries) >= 4, "cluster kernels missing from the sm_90 build"
    # The cluster barrier that publishes per-CTA statistics to the other CTAs.
    assert "barrier.cluster.arrive" in ptx90 and "barrier.cluster.wait" in ptx90
    # DSMEM: mapa turns a local shared address into another CTA's, then a generic load reads it.
    assert re.search(r"mapa(\.shared::cluster)?\.u(32|64)", ptx90), "no mapa (DSMEM addressing)"
    # The sm_80 build keeps only a trapping stub (the host never launches it there).
    assert "barrier.cluster" not in ptx80 and "mapa" not in ptx80
    assert "trap;" in ptx80


# The per-example gradient-norm kernels (layer_norm_bwd_pe, group_norm_bwd_pe): the register
# path's PE instantiations (template flag `true`, mangled "Lb1E"), their second stages, the extra
# pass of the cluster / fallback paths and GroupNorm's per-sample reduction.
PER_EXAMPLE = {"layer_norm.cu": [r"layer_norm_bwd_kernel\w*Lb1E", r"pe_split_sq_kernel",
                                 r"pe_colblock_sq_kernel",
                                 r"layer_norm_bwd_param_partial_kernel\w*Lb1E"],
               "group_norm.cu": [r"group_norm_sample_sq_kernel"]}


def _ptxas_entries(log: str) -> dict[str, tuple[int, int, int]]:
    """-Xptxas -v output: mangled entry -> (registers, spill store bytes, spill load bytes)."""
    pat = (r"Compiling entry function '(\w+)'.*?\n.*?Function properties for \w+\n\s*\d+ bytes "
           r"stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n.*?Used (\d+) registers")
    return {m[0]: (int(m[3]), int(m[1]), int(m[2])) for m in re.findall(pat, log)}


@pytest.mark.parametrize("source, arch", [(s, a) for s in PER_EXAMPLE for a in ARCHS])
def test_per_example_kernels_built_without_spills(source, arch):
    rc, log, ptx = _builds()[(source, arch)]
    assert rc == 0, log[-4000:]
    entries = _ptxas_entries(log)
    assert entries, "no ptxas -v report in the log"
    for pattern in PER_EXAMPLE[source]:
        found = {name: v for name, v in entries.items() if re.search(pattern, name)}
        assert found, f"{pattern} missing from the sm_{arch} build of {source}"
        spills = {name: v for name, v in found.items() if v[1] or v[2]}
        assert not spills, f"register spills (regs, store, load bytes): {spills}"


def test_launch_header_is_host_cxx(tmp_path):
    """launch.h (what ops.cpp includes) compiles with the host C++ compiler alone, and every
    launcher declared there is defined by some .cu (checked by symbol name)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    tu = tmp_path / "use_launch.cpp"
    header = (INCLUDE / "launch.h").read_text()
    launchers = re.findall(r"^(?:cudaError_t|size_t) (\w+)\(", header, flags=re.M)
    assert len(launchers) >= 16, launchers
    body = "\n".join(f"  (void)&fastnorm::{name};" for name in launchers)
    tu.write_text('#include "launch.h"\nint main() {\n  fastnorm::LayerNormFwdArgs a;\n'
                  '  (void)a;\n' + body + "\n  return 0;\n}\n")
    proc = subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", "-fsyntax-only",
                           f"-I{INCLUDE}", f"-I{_cuda_include()}", str(tu)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    defined = "".join((CSRC / s).read_text() for s in SOURCES)
    for name in launchers:
        assert re.search(rf"\b{name}\(const \w+& \w+(, cudaStream_t stream)?\) {{", defined), \
            f"{name} is declared in launch.h but not defined in csrc/*.cu"


def test_selftest_links():
    """csrc/selftest/kernel_selftest.cu (the GPU check's torch-free test of every launcher
    against a float64 reference) compiles and links against the sm_90 objects: every launcher
    the header declares resolves to a definition."""
    builds = _builds()
    objects = []
    for source in SOURCES:
        rc, log, _ = builds[(source, "90")]
        assert rc == 0, log[-2000:]
        objects.append(str(Path(_out_dir()) / f"{source}.90" / "out.o"))
    exe = Path(_out_dir()) / "kernel_selftest"
    cmd = [NVCC, "-std=c++17", "-O2", f"-I{INCLUDE}", "-Werror", "all-warnings",
           "-gencode=arch=compute_90,code=sm_90", str(CSRC / "selftest" / "kernel_selftest.cu"),
           *objects, "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert exe.exists()
