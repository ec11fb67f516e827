"""Every Triton kernel compiles to a cubin for sm_80 and sm_90, on a machine without a GPU.

The CPU tests run the kernels through Triton's interpreter, which accepts code the GPU compiler
rejects (and the reverse); this test runs the real compiler ahead of time (ptxas included) in a
subprocess without TRITON_INTERPRET, so a kernel that would not build on an A100/H100 fails CI.
Add an entry to SPECS for each new kernel or constexpr variant. The compile machinery lives in
benchmarks/_compile.py, shared with the static cost report (benchmarks/static_report.py).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import _compile  # noqa: E402

# (module, kernel, signature: arg -> triton type (runtime args) or "constexpr", constexpr values,
#  num_warps). ACC values name a triton dtype.
SPECS = []


def _ln_specs():
    specs = []
    ptrs = lambda names, t: {n: t for n in names}  # noqa: E731
    for dt, acc in (("bf16", "float32"), ("fp32", "float32"), ("fp16", "float32"),
                    ("fp64", "float64")):
        stat = "fp64" if dt == "fp64" else "fp32"
        # Fused residual add (HAS_RESIDUAL, STORE_RESIDUAL, HAS_DRESIDUAL) and the transformers
        # Llama and T5 roundings (ROUND_XHAT, ROUND_DX_TERMS): the plain variants and ones with the flags on, per dtype;
        # for bf16 also a residual stream in fp32 (residual_in_fp32).
        for is_rms, residual, round_xhat, store in ((False, False, False, False),
                                                    (True, False, False, False),
                                                    (False, True, False, True),
                                                    (True, True, True, True),
                                                    (True, True, False, False)):
            flags = {"IS_RMS": is_rms, "HAS_WEIGHT": True, "HAS_BIAS": not is_rms, "ACC": acc}
            fwd_flags = {**flags, "HAS_RESIDUAL": residual, "STORE_RESIDUAL": store,
                         "ROUND_XHAT": round_xhat}
            for res_dt in ((dt, "fp32") if residual and dt == "bf16" else (dt,)):
                fwd_sig = {**ptrs("XY", f"*{dt}"), **ptrs("WB", f"*{dt}"),
                           **ptrs(["Mean", "Rstd"], f"*{stat}"), "R": f"*{res_dt}",
                           "H": f"*{res_dt}", "M": "i32", "N": "i32", "stride_x": "i32",
                           "stride_y": "i32", "stride_r": "i32", "stride_h": "i32", "eps": "fp64"}
                specs.append(("layer_norm", "_layer_norm_fwd_kernel", fwd_sig,
                              {**fwd_flags, "BLOCK_M": 4, "BLOCK_N": 1024}, 8))
                specs.append(("layer_norm", "_layer_norm_fwd_kernel", fwd_sig,
                              {**fwd_flags, "BLOCK_M": 1,
                               "BLOCK_N": 16384 if dt != "fp64" else 8192}, 16))
                chunk_sig = fwd_sig  # persistent over rows: takes M too
                specs.append(("layer_norm", "_layer_norm_fwd_chunked_kernel", chunk_sig,
                              {**fwd_flags, "BLOCK_N": 4096 if dt != "fp64" else 2048},
                              {"bf16": 16, "fp16": 16, "fp32": 4, "fp64": 4}[dt]))
            # backward: X is the norm's input (h, fp32 for an fp32 residual stream)
            x_dt = "fp32" if residual and dt == "bf16" else dt
            stats_sig = {"X": f"*{x_dt}", "W": f"*{dt}", "DY": f"*{dt}", "Mean": f"*{stat}",
                         "Rstd": f"*{stat}", "C1": f"*{stat}", "C2": f"*{stat}", "N": "i32",
                         "stride_x": "i32", "stride_dy": "i32"}
            specs.append(("layer_norm", "_layer_norm_bwd_row_stats_kernel", stats_sig,
                          {"IS_RMS": is_rms, "HAS_WEIGHT": True, "ROUND_XHAT": round_xhat,
                           "ACC": acc, "BLOCK_N": 4096}, 8))
            bwd_sig = {"X": f"*{x_dt}", "W": f"*{dt}", "DY": f"*{dt}", "DX": f"*{x_dt}",
                       "Mean": f"*{stat}", "Rstd": f"*{stat}", "C1": f"*{stat}", "C2": f"*{stat}",
                       "DW_partial": f"*{stat}", "DB_partial": f"*{stat}", "DRES": f"*{x_dt}",
                       "PE_DW": f"*{stat}", "PE_DB": f"*{stat}",
                       "M": "i32", "N": "i32", "stride_x": "i32", "stride_dy": "i32",
                       "stride_dx": "i32", "stride_dres": "i32", "rows_per_program": "i32",
                       "rows_per_example": "i32", "slots_per_program": "i32",
                       "first_group": "i32"}
            rows_sig = {k: v for k, v in bwd_sig.items()
                        if k not in ("C1", "C2", "first_group")}
            # PER_EXAMPLE on: layer_norm_bwd_per_example's launch (no residual, no rounding).
            for per_example in ((False, True) if not residual and not round_xhat else (False,)):
                specs.append(("layer_norm", "_layer_norm_bwd_rows_kernel", rows_sig,
                              {**flags, "HAS_DRESIDUAL": residual, "ROUND_XHAT": round_xhat,
                               "ROUND_DX_TERMS": round_xhat, "PER_EXAMPLE": per_example,
                               "BLOCK_N": 4096 if dt != "fp64" else 2048},
                              16 if dt != "fp64" else 8))
            for in_tile, block_m, block_n, warps in ((True, 2, 1024, 4), (True, 1, 8192, 16),
                                                     (False, 1, 4096, 8)):
                if dt == "fp64" and block_n == 8192:
                    block_n = 4096
                specs.append(("layer_norm", "_layer_norm_bwd_kernel", bwd_sig,
                              {**flags, "HAS_DRESIDUAL": residual, "ROUND_XHAT": round_xhat,
                               "ROUND_DX_TERMS": round_xhat,  # T5: with the Llama rounding
                               "ROW_STATS_IN_TILE": in_tile, "PER_EXAMPLE": False,
                               "PE_IN_SLOT": False,
                               # a later row chunk adds into the partial rows
                               "ACCUMULATE": not in_tile, "BLOCK_M": block_m,
                               "BLOCK_N": block_n}, warps))
            if not residual and not round_xhat:  # layer_norm_bwd_per_example's launch
                specs.append(("layer_norm", "_layer_norm_bwd_kernel", bwd_sig,
                              {**flags, "HAS_DRESIDUAL": False, "ROUND_XHAT": False,
                               "ROUND_DX_TERMS": False, "ROW_STATS_IN_TILE": True,
                               "PER_EXAMPLE": True, "PE_IN_SLOT": False, "ACCUMULATE": False,
                               "BLOCK_M": 2,
                               "BLOCK_N": 1024}, 4))
                # ... on the column-chunked path (row statistics from the first kernel)
                specs.append(("layer_norm", "_layer_norm_bwd_kernel", bwd_sig,
                              {**flags, "HAS_DRESIDUAL": False, "ROUND_XHAT": False,
                               "ROUND_DX_TERMS": False, "ROW_STATS_IN_TILE": False,
                               "PER_EXAMPLE": True, "PE_IN_SLOT": False, "ACCUMULATE": True,
                               "BLOCK_M": 1,
                               "BLOCK_N": 4096 if dt != "fp64" else 2048}, 8))
    for dt in ("fp32", "fp64"):
        for two in (False, True):  # dW alone, or dW and dB in one launch
            specs.append(("_common", "_column_sum_kernel",
                          {"P": f"*{dt}", "Out": f"*{dt}", "P2": f"*{dt}", "Out2": f"*{dt}",
                           "num_rows": "i32", "N": "i32", "stride_p": "i32",
                           "stride_p2": "i32"}, {"TWO": two, "BLOCK_P": 32, "BLOCK_N": 128},
                          4))
    return specs


SPECS += _ln_specs()


def _gn_specs():
    specs = []
    for dt, acc in (("bf16", "float32"), ("fp32", "float32"), ("fp16", "float32"),
                    ("fp64", "float64")):
        stat = "fp64" if dt == "fp64" else "fp32"
        stats_sig = {"X": f"*{dt}", "PMean": f"*{stat}", "PM2": f"*{stat}", "C": "i32",
                     "HW": "i32", "split_size": "i32", "num_splits": "i32", "num_c_blocks": "i32"}
        combine_sig = {"PMean": f"*{stat}", "PM2": f"*{stat}", "Mean": f"*{stat}",
                       "Rstd": f"*{stat}", "C": "i32", "HW": "i32", "G": "i32",
                       "group_size": "i32", "split_size": "i32", "num_splits": "i32",
                       "eps": "fp64"}
        apply_sig = {"X": f"*{dt}", "Y": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}",
                     "Mean": f"*{stat}", "Rstd": f"*{stat}", "C": "i32", "HW": "i32", "G": "i32",
                     "group_size": "i32", "num_s_blocks": "i32", "num_c_blocks": "i32",
                     "num_tiles": "i32"}
        reduce_sig = {"X": f"*{dt}", "DY": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}",
                      "Mean": f"*{stat}", "Rstd": f"*{stat}", "P1": f"*{stat}", "P2": f"*{stat}",
                      "C": "i32", "HW": "i32", "G": "i32", "group_size": "i32",
                      "split_size": "i32", "num_splits": "i32", "num_c_blocks": "i32"}
        bwd_combine_sig = {"P1": f"*{stat}", "P2": f"*{stat}", "W": f"*{dt}", "C1": f"*{stat}",
                           "C2": f"*{stat}", "C": "i32", "HW": "i32", "G": "i32",
                           "group_size": "i32", "num_splits": "i32"}
        dx_sig = {"X": f"*{dt}", "DY": f"*{dt}", "DX": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}",
                  "Mean": f"*{stat}", "Rstd": f"*{stat}", "C1": f"*{stat}", "C2": f"*{stat}",
                  "C": "i32", "HW": "i32", "G": "i32", "group_size": "i32",
                  "num_s_blocks": "i32", "num_c_blocks": "i32", "num_tiles": "i32"}
        tile = 2048 if dt == "fp64" else 4096
        # (CHANNELS_LAST, BLOCK_S, BLOCK_C): NCHW long spatial runs, channels-last channel runs.
        tilings = ((False, tile, 1), (False, tile // 4, 4), (True, tile // 256, 256),
                   (True, tile // 64, 64))
        for channels_last, block_s, block_c in tilings:
            blocks = {"BLOCK_S": block_s, "BLOCK_C": block_c}
            specs.append(("group_norm", "_group_norm_fwd_stats_kernel", stats_sig,
                          {"CHANNELS_LAST": channels_last, "ACC": acc, **blocks}, 8))
            for activation in ("none", "silu"):
                for affine in ((True, False) if block_c == 1 else (True,)):
                    flags = {"CHANNELS_LAST": channels_last, "HAS_WEIGHT": affine,
                             "HAS_BIAS": affine, "ACTIVATION": activation, "ACC": acc, **blocks}
                    specs.append(("group_norm", "_group_norm_fwd_apply_kernel", apply_sig,
                                  flags, 8))
                    specs.append(("group_norm", "_group_norm_bwd_reduce_kernel", reduce_sig,
                                  flags, 8))
                    specs.append(("group_norm", "_group_norm_bwd_dx_kernel", dx_sig, flags, 8))
        fused_fwd_sig = {"X": f"*{dt}", "Y": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}",
                         "Mean": f"*{stat}", "Rstd": f"*{stat}", "HW": "i32", "G": "i32",
                         "group_size": "i32", "eps": "fp64"}
        fused_bwd_sig = {"X": f"*{dt}", "DY": f"*{dt}", "DX": f"*{dt}", "W": f"*{dt}",
                         "B": f"*{dt}", "Mean": f"*{stat}", "Rstd": f"*{stat}", "P1": f"*{stat}",
                         "P2": f"*{stat}", "C": "i32", "HW": "i32", "G": "i32",
                         "group_size": "i32"}
        half = 2 if dt == "fp64" else 1  # fused limits 16384 (fwd) / 8192 (bwd), halved for fp64
        for kernel, sig, block_s, block_c, warps in (
                ("_group_norm_fwd_fused_kernel", fused_fwd_sig, 4096 // half, 4, 16),
                ("_group_norm_fwd_fused_kernel", fused_fwd_sig, 64, 16, 2),
                ("_group_norm_bwd_fused_kernel", fused_bwd_sig, 2048 // half, 4, 16 // half),
                ("_group_norm_bwd_fused_kernel", fused_bwd_sig, 64, 16, 2)):
            for activation in ("none", "silu"):
                for affine in ((True, False) if block_s == 64 else (True,)):
                    specs.append(("group_norm", kernel, sig,
                                  {"HAS_WEIGHT": affine, "HAS_BIAS": affine,
                                   "ACTIVATION": activation, "ACC": acc, "BLOCK_S": block_s,
                                   "BLOCK_C": block_c}, warps))
        specs.append(("group_norm", "_group_norm_fwd_combine_kernel", combine_sig,
                      {"ACC": acc, "BLOCK_K": 1024}, 4))
        for has_weight in (True, False):
            specs.append(("group_norm", "_group_norm_bwd_combine_kernel", bwd_combine_sig,
                          {"HAS_WEIGHT": has_weight, "ACC": acc, "BLOCK_K": 64}, 4))
        if dt in ("fp32", "bf16"):
            # At run time Triton turns int arguments equal to 1 into constants (G=C, HW=1, one
            # split): every kernel must still build with them.
            ones = {"group_size": 1, "num_splits": 1, "split_size": 1, "HW": 1,
                    "num_c_blocks": 1, "num_s_blocks": 1, "num_tiles": 1}
            tile_flags = {"CHANNELS_LAST": False, "HAS_WEIGHT": True, "HAS_BIAS": True,
                          "ACTIVATION": "silu", "ACC": acc, "BLOCK_S": 1, "BLOCK_C": 4}
            for kernel, sig, flags in (
                    ("_group_norm_fwd_stats_kernel", stats_sig,
                     {"CHANNELS_LAST": False, "ACC": acc, "BLOCK_S": 1, "BLOCK_C": 4}),
                    ("_group_norm_fwd_combine_kernel", combine_sig, {"ACC": acc, "BLOCK_K": 1}),
                    ("_group_norm_fwd_apply_kernel", apply_sig, tile_flags),
                    ("_group_norm_bwd_reduce_kernel", reduce_sig, tile_flags),
                    ("_group_norm_bwd_combine_kernel", bwd_combine_sig,
                     {"HAS_WEIGHT": True, "ACC": acc, "BLOCK_K": 1}),
                    ("_group_norm_bwd_dx_kernel", dx_sig, tile_flags),
                    ("_group_norm_fwd_fused_kernel", fused_fwd_sig,
                     {k: v for k, v in tile_flags.items() if k != "CHANNELS_LAST"}),
                    ("_group_norm_bwd_fused_kernel", fused_bwd_sig,
                     {k: v for k, v in tile_flags.items() if k != "CHANNELS_LAST"})):
                fixed = {k: v for k, v in ones.items() if k in sig}
                specs.append(("group_norm", kernel, sig, {**flags, **fixed}, 1))
    return specs


SPECS += _gn_specs()

# --- channels-first LayerNorm / RMSNorm (fastnorm/triton/layer_norm_2d.py) ---------------------
# The NCHW kernels' variants the launchers pick at ConvNeXt shapes (N = 64; C = 96..2048; S =
# 56^2..7^2) on a 132-SM device, per dtype: (whole C, BLOCK_C, BLOCK_S, num_warps); channels-last
# inputs run the row LayerNorm kernels (specs above). Stage 1-2 shapes have C and S multiples of
# 16, so their launches compile with those (and the pointers) divisible by 16.
LN2D_FWD_TILES = {
    "bf16": ((True, 128, 64, 16), (True, 256, 64, 16), (True, 512, 32, 16),
             (True, 1024, 16, 16), (False, 256, 16, 8)),
    "fp16": ((True, 1024, 16, 16), (False, 256, 16, 8)),
    "fp32": ((True, 128, 32, 8), (True, 256, 32, 16), (True, 512, 32, 16), (True, 1024, 8, 16),
             (True, 2048, 8, 16), (False, 512, 8, 8)),
    "fp64": ((True, 128, 16, 4), (True, 512, 16, 16), (True, 2048, 4, 16), (False, 512, 4, 4)),
}
LN2D_BWD_TILES = {
    "bf16": ((True, 128, 64, 16), (True, 256, 32, 16), (True, 512, 16, 16), (False, 128, 16, 4)),
    "fp16": ((True, 512, 16, 16), (False, 128, 16, 4)),
    "fp32": ((True, 128, 32, 8), (True, 256, 32, 16), (False, 256, 8, 4)),
    "fp64": ((True, 64, 32, 4), (True, 128, 16, 4), (False, 256, 4, 2)),
}


def _layer_norm_2d_specs():
    specs = []
    for dt, acc in (("bf16", "float32"), ("fp32", "float32"), ("fp16", "float32"),
                    ("fp64", "float64")):
        stat = "fp64" if dt == "fp64" else "fp32"
        fwd_sig = {"X": f"*{dt}", "Y": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}",
                   "Mean": f"*{stat}", "Rstd": f"*{stat}", "C": "i32", "S": "i32",
                   "s_blocks": "i32", "eps": "fp64"}
        bwd_sig = {"X": f"*{dt}", "W": f"*{dt}", "DY": f"*{dt}", "DX": f"*{dt}",
                   "Mean": f"*{stat}", "Rstd": f"*{stat}", "DW_partial": f"*{stat}",
                   "DB_partial": f"*{stat}", "C": "i32", "S": "i32", "s_blocks": "i32",
                   "num_tiles": "i32", "tiles_per_program": "i32"}
        for kernel, sig, tiles in (("_layer_norm_2d_fwd_kernel", fwd_sig, LN2D_FWD_TILES[dt]),
                                   ("_layer_norm_2d_bwd_kernel", bwd_sig, LN2D_BWD_TILES[dt])):
            for i, (whole, block_c, block_s, warps) in enumerate(tiles):
                # LayerNorm with weight and bias on every tile; RMSNorm and no-affine on the
                # first whole-C tile and the chunked one.
                variants = [(False, True)]
                if i == 0 or not whole:
                    variants += [(True, True), (False, False)]
                for is_rms, affine in variants:
                    flags = {"IS_RMS": is_rms, "HAS_WEIGHT": affine,
                             "HAS_BIAS": affine and not is_rms, "WHOLE_C": whole, "ACC": acc,
                             "BLOCK_C": block_c, "BLOCK_S": block_s}
                    divisible = [k for k, v in sig.items() if v.startswith("*")] + ["C", "S"] \
                        if whole and block_c <= 256 else []
                    specs.append(("layer_norm_2d", kernel, sig, flags, warps, divisible))
    return specs


SPECS += _layer_norm_2d_specs()


def _per_example_specs():
    """The per-example (noise-scale) backward's own launches: the whole-row tile at BLOCK_N 8192
    (16 warps) summing into its slot rows with both parameters (PE_IN_SLOT) and in registers
    with one, at 4096 in registers; _per_example_sq_kernel (many narrow examples a program, or
    one wide one) and the noise-scale sums (_gns_sums_kernel)."""
    specs = []
    for dt, acc in (("bf16", "float32"), ("fp32", "float32"), ("fp16", "float32"),
                    ("fp64", "float64")):
        stat = "fp64" if dt == "fp64" else "fp32"
        sig = {"X": f"*{dt}", "W": f"*{dt}", "DY": f"*{dt}", "DX": f"*{dt}", "Mean": f"*{stat}",
               "Rstd": f"*{stat}", "C1": f"*{stat}", "C2": f"*{stat}",
               "DW_partial": f"*{stat}", "DB_partial": f"*{stat}", "DRES": f"*{dt}",
               "PE_DW": f"*{stat}", "PE_DB": f"*{stat}", "M": "i32", "N": "i32",
               "stride_x": "i32", "stride_dy": "i32", "stride_dx": "i32", "stride_dres": "i32",
               "rows_per_program": "i32", "rows_per_example": "i32",
               "slots_per_program": "i32", "first_group": "i32"}
        wide = 4096 if dt == "fp64" else 8192
        for is_rms, block_n, warps in ((False, wide, 16), (True, wide, 16),
                                       (False, wide // 2, 8)):
            specs.append(("layer_norm", "_layer_norm_bwd_kernel", sig,
                          {"IS_RMS": is_rms, "HAS_WEIGHT": True, "HAS_BIAS": not is_rms,
                           "HAS_DRESIDUAL": False, "ROUND_XHAT": False, "ROUND_DX_TERMS": False,
                           "ROW_STATS_IN_TILE": True, "PER_EXAMPLE": True,
                           "PE_IN_SLOT": not is_rms and warps == 16, "ACCUMULATE": False,
                           "ACC": acc, "BLOCK_M": 1, "BLOCK_N": block_n}, warps))
        if dt in ("fp32", "fp64"):  # the slot rows / partials are in the statistics dtype
            pe_sig = {"P": f"*{dt}", "P2": f"*{dt}", "Out": f"*{dt}", "Out2": f"*{dt}",
                      "num_examples": "i32", "N": "i32", "rows_per_program": "i32",
                      "rows_per_example": "i32", "slots_per_program": "i32",
                      "max_span": "i32"}
            for has_p2, block_e, block_n, warps in ((True, 1, 2048, 8), (True, 128, 16, 8),
                                                    (False, 2, 1024, 8)):
                specs.append(("_common", "_per_example_sq_kernel", pe_sig,
                              {"HAS_P": True, "HAS_P2": has_p2, "ACC": acc, "BLOCK_E": block_e,
                               "BLOCK_N": block_n}, warps))
            specs.append(("_common", "_gns_sums_kernel",
                          {"SqW": f"*{dt}", "SqB": f"*{dt}", "DW": "*bf16", "DB": "*bf16",
                           "Sums": "*fp32", "num_sq_w": "i32", "num_sq_b": "i32",
                           "num_w": "i32", "num_b": "i32", "examples": "i32"},
                          {"ACC": acc, "BLOCK": 1024}, 4))
    return specs


SPECS += _per_example_specs()


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
def test_kernels_compile_for_gpu(cc):
    failures = [r["error"] for r in _compile.run_specs(SPECS, cc) if r["error"]]
    assert not failures, "\n".join(failures)


def _bn_specs():
    """BatchNorm: every kernel in both directions, both layouts, each input dtype, with and
    without weight/bias/ReLU; tile shapes the launchers pick (extra ones for fp32)."""
    specs = []
    for dt, acc in (("bf16", "float32"), ("fp32", "float32"), ("fp16", "float32"),
                    ("fp64", "float64")):
        stat = "fp64" if dt == "fp64" else "fp32"
        ptr_sig = {"X": f"*{dt}", "DY": f"*{dt}", "Mean": f"*{stat}", "Var": f"*{stat}",
                   "W": "*fp32", "B": "*fp32"}
        cl_tiles = ((16, 256), (64, 64), (4096, 1)) if dt == "fp32" else ((16, 256),)
        cf_tiles = ((2, 2048), (32, 128), (64, 64)) if dt == "fp32" else ((16, 256),)
        for backward, affine, relu in ((False, False, False), (True, True, True)):
            flags = {"BACKWARD": backward, "HAS_WEIGHT": affine, "HAS_BIAS": affine,
                     "RELU": relu, "ACC": acc}
            cl_sig = {**ptr_sig, "Partial1": f"*{stat}", "Partial2": f"*{stat}", "M": "i32",
                      "C": "i32", "rows_per_program": "i32", "eps": "fp64"}
            for block_m, block_c in cl_tiles:
                specs.append(("batch_norm", "_batch_norm_reduce_cl_kernel", cl_sig,
                              {**flags, "BLOCK_M": block_m, "BLOCK_C": block_c}, 8))
            cf_sig = {**ptr_sig, "Partial1": f"*{stat}", "Partial2": f"*{stat}", "N": "i32",
                      "C": "i32", "S": "i32", "chunks_per_program": "i32", "eps": "fp64"}
            for block_n, block_s in cf_tiles:
                specs.append(("batch_norm", "_batch_norm_reduce_cf_kernel", cf_sig,
                              {**flags, "BLOCK_N": block_n, "BLOCK_S": block_s}, 8))
        for backward, training, affine, relu in ((False, False, True, True),
                                                 (True, True, True, True),
                                                 (True, False, False, False)):
            # The training backward's count: an integer (single device) or a 1-element tensor
            # (SyncBatchNorm's global count).
            for count_ptr in ((False, True) if training else (False,)):
                flags = {"BACKWARD": backward, "TRAINING": training, "HAS_WEIGHT": affine,
                         "HAS_BIAS": affine, "RELU": relu, "COUNT_PTR": count_ptr, "ACC": acc}
                sig = {**ptr_sig, "Out": f"*{dt}", "SumDy": f"*{stat}",
                       "SumDyXhat": f"*{stat}", "Count": f"*{stat}"}
                specs.append(("batch_norm", "_batch_norm_elementwise_cl_kernel",
                              {**sig, "M": "i32", "C": "i32", "eps": "fp64",
                               "count_value": "i64"},
                              {**flags, "BLOCK_M": 16, "BLOCK_C": 256}, 8))
                for block_r, block_s in ((16, 256), (32, 128)):
                    specs.append(("batch_norm", "_batch_norm_elementwise_cf_kernel",
                                  {**sig, "R": "i32", "C": "i32", "S": "i32", "eps": "fp64",
                                   "count_value": "i64"},
                                  {**flags, "BLOCK_R": block_r, "BLOCK_S": block_s}, 8))
        combine_sig = {"Partial1": f"*{stat}", "Partial2": f"*{stat}", "X": f"*{dt}",
                       "Out1": f"*{stat}", "Out2": f"*{stat}", "RunningMean": "*fp32",
                       "RunningVar": "*fp32", "Momentum": f"*{stat}", "num_partials": "i32",
                       "C": "i32", "shift_stride": "i32", "count": "i64", "momentum": "fp64"}
        for backward, update, momentum_ptr in ((False, True, False), (False, True, True),
                                               (True, False, False)):
            specs.append(("batch_norm", "_batch_norm_combine_kernel", combine_sig,
                          {"BACKWARD": backward, "UPDATE_RUNNING": update,
                           "MOMENTUM_PTR": momentum_ptr, "ACC": acc, "BLOCK_P": 128,
                           "BLOCK_C": 32}, 4))
    return specs


SPECS += _bn_specs()


def _nan_specs():
    """The kernels whose max/clamp touch data, in fp32 and bf16 (fused ReLU, variance and M2
    clamps)."""
    return [s for s in SPECS if s[1] in ("_batch_norm_combine_kernel",
                                         "_batch_norm_elementwise_cl_kernel",
                                         "_group_norm_fwd_stats_kernel")
            and s[2].get("X") in ("*fp32", "*bf16") and s[3].get("BLOCK_C") != 64
            and (s[3].get("RELU", True) and not s[3].get("BACKWARD", False))]


def test_max_and_clamp_propagate_nan_in_ptx(cc=90):
    """The interpreter propagates NaN through tl.maximum whatever the code says; the GPU
    compiler emits max.f32 (drops a NaN operand) unless asked for max.NaN.f32. Check the PTX
    (sm_90; sm_80 PTX has the same instructions): every float max/min the data touches is the
    NaN-propagating form. What the hardware then does is only checkable on a GPU."""
    specs = _nan_specs()
    assert {s[1] for s in specs} == {"_batch_norm_combine_kernel",
                                     "_batch_norm_elementwise_cl_kernel",
                                     "_group_norm_fwd_stats_kernel"}
    for spec, result in zip(specs, _compile.run_specs(specs, cc, stats=True)):
        assert result["error"] is None, result["error"]
        counts = result["minmax"]
        assert any(".NaN." in k for k in counts), (spec[1], spec[3], counts)
        plain = {k: v for k, v in counts.items() if ".NaN." not in k}
        assert not plain, (spec[1], spec[3], plain)


def test_fp64_kernels_take_fp64_eps():
    """A Python float argument reaches a compiled kernel as fp32 unless declared otherwise:
    eps (and the BatchNorm momentum) are declared tl.float64, so fp64 kernels get them exactly."""
    specs = [s for s in SPECS if s[2].get("eps") == "fp64" and s[2].get("X") == "*fp64"][:2]
    specs += [s for s in SPECS if s[1] == "_batch_norm_combine_kernel"
              and s[2]["X"] == "*fp64"][:1]
    assert len(specs) == 3
    for spec, result in zip(specs, _compile.run_specs(specs, 90, stats=True)):
        assert result["error"] is None, result["error"]
        assert result["f64_params"] >= 1, spec[1]
