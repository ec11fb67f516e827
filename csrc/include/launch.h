// Host launchers of the torch-free kernels: plain-data argument structs and
// `cudaError_t launch_<op>_<dir>(const Args&, cudaStream_t)`.
//
// Conventions for every struct:
// - Pointers are device pointers; element types are given by `dtype` (x, y, dy, dx) and
//   `param_dtype` (weight, bias, dweight, dbias: equal to dtype or kFloat32). Statistics (mean,
//   rstd, var, sums, count) are always fp32. An absent optional operand is nullptr.
// - Sizes and strides are in elements. Rows (LayerNorm) have unit column stride.
// - Launchers that need scratch memory take `workspace` (device memory, any content, 16-byte
//   aligned, at least `<op>_workspace_bytes(args)` bytes, which depends only on the shapes, the
//   flags and the current device) and return cudaErrorInvalidValue when it is too small.
// - The current device must be the tensors' device (ops.cpp holds the device guard). Launchers
//   enqueue on `stream` and never synchronize; they return the first launch error.
// - Empty inputs are handled here (nothing to launch, or zeros / NaN where torch defines them).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dispatch.h"

namespace fastnorm {

enum class Activation : int { kNone = 0, kSilu = 1, kRelu = 2 };

// ---- LayerNorm / RMSNorm on a 2-D view: M rows of N features ---------------------------------

struct LayerNormFwdArgs {
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* x = nullptr;       // [M, N], row stride x_row_stride
  void* y = nullptr;             // [M, N], row stride y_row_stride
  const void* weight = nullptr;  // [N] or null
  const void* bias = nullptr;    // [N] or null (ignored when is_rms)
  float* mean = nullptr;         // [M]; unused (may be null) when is_rms
  float* rstd = nullptr;         // [M]
  int64_t M = 0, N = 0;
  int64_t x_row_stride = 0, y_row_stride = 0;
  float eps = 1e-5f;
  bool is_rms = false;
};

struct LayerNormBwdArgs {
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* dy = nullptr;      // [M, N]
  const void* x = nullptr;       // [M, N]
  const void* weight = nullptr;  // [N] or null
  const float* mean = nullptr;   // [M]; unused when is_rms
  const float* rstd = nullptr;   // [M]
  void* dx = nullptr;            // [M, N]
  void* dweight = nullptr;       // [N] in param_dtype, or null (not wanted)
  void* dbias = nullptr;         // [N] in param_dtype, or null (not wanted; always null for RMS)
  int64_t M = 0, N = 0;
  int64_t x_row_stride = 0, dy_row_stride = 0, dx_row_stride = 0;
  bool is_rms = false;
  // Per-example mode (layer_norm_bwd_pe) when > 0: an example is rows_per_example consecutive
  // rows (M a multiple of it); dweight_sq / dbias_sq [M / rows_per_example] fp32 get each
  // example's squared norm of its dW / dB contribution (null: not wanted). dx, dweight and dbias
  // are bitwise those of the plain mode.
  int64_t rows_per_example = 0;
  float* dweight_sq = nullptr;
  float* dbias_sq = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

size_t layer_norm_bwd_workspace_bytes(const LayerNormBwdArgs& args);
cudaError_t launch_layer_norm_fwd(const LayerNormFwdArgs& args, cudaStream_t stream);
cudaError_t launch_layer_norm_bwd(const LayerNormBwdArgs& args, cudaStream_t stream);

// ---- GroupNorm on an (N, C, HW) view, NCHW-contiguous or channels-last ------------------------
// channels_last: element (n, c, s) at n*C*HW + s*C + c, else at n*C*HW + c*HW + s. x, y, dy and
// dx all have that one layout. mean / rstd are [N, G].

struct GroupNormFwdArgs {
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* x = nullptr;
  void* y = nullptr;
  const void* weight = nullptr;  // [C] or null
  const void* bias = nullptr;    // [C] or null
  float* mean = nullptr;         // [N, G]
  float* rstd = nullptr;         // [N, G]
  int64_t N = 0, C = 0, HW = 0, G = 1;
  float eps = 1e-5f;
  bool channels_last = false;
  Activation activation = Activation::kNone;  // kNone or kSilu
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct GroupNormBwdArgs {
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* weight = nullptr;  // [C] or null
  const void* bias = nullptr;    // [C] or null (read by the SiLU backward)
  const float* mean = nullptr;   // [N, G]
  const float* rstd = nullptr;   // [N, G]
  void* dx = nullptr;
  void* dweight = nullptr;       // [C] in param_dtype, or null
  void* dbias = nullptr;         // [C] in param_dtype, or null
  int64_t N = 0, C = 0, HW = 0, G = 1;
  bool channels_last = false;
  Activation activation = Activation::kNone;
  // group_norm_bwd_pe: [N] fp32 per-sample squared norms of the dweight / dbias contributions
  // (null: not wanted); dx, dweight and dbias are unchanged by them.
  float* dweight_sq = nullptr;
  float* dbias_sq = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

size_t group_norm_fwd_workspace_bytes(const GroupNormFwdArgs& args);
size_t group_norm_bwd_workspace_bytes(const GroupNormBwdArgs& args);
cudaError_t launch_group_norm_fwd(const GroupNormFwdArgs& args, cudaStream_t stream);
cudaError_t launch_group_norm_bwd(const GroupNormBwdArgs& args, cudaStream_t stream);

// ---- BatchNorm on an (N, C, S) view, contiguous (channels-first) or channels-last -------------
// channels_last: strides (S*C, 1, C), i.e. an (N*S, C) row-major matrix. The building blocks
// SyncBatchNorm uses (stats -> all-reduce -> apply; backward_reduce -> all-reduce ->
// backward_elemt) plus the single-device training forward / backward composed from them.

struct BatchNormStatsArgs {  // per-channel mean and biased variance; zeros for an empty x
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  float* mean = nullptr;  // [C]
  float* var = nullptr;   // [C]
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct BatchNormApplyArgs {  // y = act((x - mean) / sqrt(var + eps) * weight + bias)
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* x = nullptr;
  void* y = nullptr;
  const float* mean = nullptr;   // [C]
  const float* var = nullptr;    // [C]
  const void* weight = nullptr;  // [C] or null
  const void* bias = nullptr;    // [C] or null
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;
  float eps = 1e-5f;
  bool relu = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct BatchNormBwdReduceArgs {  // sum_dy = sum g, sum_dy_xhat = sum g * x_hat, g = ReLU-masked dy
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* dy = nullptr;
  const void* x = nullptr;
  const float* mean = nullptr;
  const float* var = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  float* sum_dy = nullptr;       // [C]
  float* sum_dy_xhat = nullptr;  // [C]
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;
  float eps = 1e-5f;
  bool relu = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct BatchNormBwdElemtArgs {
  // Training (sum_dy non-null): dx = w*rstd*(g - sum_dy/count - x_hat*sum_dy_xhat/count), with
  // count a 1-element device value (a global count needs no host sync). Eval (sum_dy null):
  // dx = w*rstd*g.
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* dy = nullptr;
  const void* x = nullptr;
  const float* mean = nullptr;
  const float* var = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const float* sum_dy = nullptr;
  const float* sum_dy_xhat = nullptr;
  const float* count = nullptr;  // [1]
  void* dx = nullptr;
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;
  float eps = 1e-5f;
  bool relu = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct BatchNormFwdArgs {  // training forward: stats, then apply
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* x = nullptr;
  void* y = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  float* mean = nullptr;  // [C] out
  float* var = nullptr;   // [C] out, biased
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;
  float eps = 1e-5f;
  bool relu = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct BatchNormBwdArgs {  // backward_reduce, then backward_elemt (count = N*S when training)
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const float* mean = nullptr;
  const float* var = nullptr;
  void* dx = nullptr;
  float* sum_dy = nullptr;       // [C] out (dbias)
  float* sum_dy_xhat = nullptr;  // [C] out (dweight)
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;
  float eps = 1e-5f;
  bool relu = false;
  bool training = true;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

size_t batch_norm_stats_workspace_bytes(const BatchNormStatsArgs& args);
size_t batch_norm_apply_workspace_bytes(const BatchNormApplyArgs& args);
size_t batch_norm_bwd_reduce_workspace_bytes(const BatchNormBwdReduceArgs& args);
size_t batch_norm_bwd_elemt_workspace_bytes(const BatchNormBwdElemtArgs& args);
size_t batch_norm_fwd_workspace_bytes(const BatchNormFwdArgs& args);
size_t batch_norm_bwd_workspace_bytes(const BatchNormBwdArgs& args);
cudaError_t launch_batch_norm_stats(const BatchNormStatsArgs& args, cudaStream_t stream);
cudaError_t launch_batch_norm_apply(const BatchNormApplyArgs& args, cudaStream_t stream);
cudaError_t launch_batch_norm_bwd_reduce(const BatchNormBwdReduceArgs& args, cudaStream_t stream);
cudaError_t launch_batch_norm_bwd_elemt(const BatchNormBwdElemtArgs& args, cudaStream_t stream);
cudaError_t launch_batch_norm_fwd(const BatchNormFwdArgs& args, cudaStream_t stream);
cudaError_t launch_batch_norm_bwd(const BatchNormBwdArgs& args, cudaStream_t stream);

}  // namespace fastnorm
