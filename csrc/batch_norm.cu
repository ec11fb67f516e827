// BatchNorm on an (N, C, S) view, contiguous (channels-first) or channels-last, with optional
// fused ReLU: the building blocks SyncBatchNorm composes (stats -> all-reduce -> apply;
// backward_reduce -> all-reduce -> backward_elemt) and the single-device training forward /
// backward made of them. Torch-free; entry points in launch.h. The contract of
// fastnorm/triton/batch_norm.py: per-channel fp32 statistics, biased variance,
//   y = act(((x - mean) * rstd) * w + b), rstd = 1/sqrt(var + eps);
//   g = dy masked by z > 0 (ReLU; z recomputed with the forward's expression, so the mask matches
//   bit for bit; NaN z propagates forward and masks to 0 backward, as torch);
//   backward_reduce: sum_dy = sum g, sum_dy_xhat = sum g * x_hat (= dbias, dweight);
//   backward_elemt: dx = w * rstd * (g - sum_dy / count - x_hat * sum_dy_xhat / count)
//   (training; count is a device scalar so a global SyncBN count needs no host sync), or
//   dx = w * rstd * g (eval).
//
// Kernels (shared ones in channel_norm.cuh):
//   stats: reduce -> per-(split, n, c) (CF) or per-(split, c) (CL) partials (count, mean, M2) from
//          per-thread shifted sums + Chan merges; combine: one thread per channel merges them in
//          (split, n) order into (mean, var).
//   apply: a per-channel table {mean, rstd, w, b}, then one elementwise pass (16-byte packs when
//          S (CF) or C (CL) is a multiple of the pack width).
//   backward_reduce: table, reduce of (g x_hat, g), per-channel fixed-order sums.
//   backward_elemt: table {mean, rstd, w, b} + {w sum_dy_xhat / count, w sum_dy / count}, then
//          dx = (w g - (x_hat c1 + c2)) * rstd elementwise.
// HBM traffic: forward 2 reads of x + 1 write of y; backward 2 reads of x and dy + 1 write of dx
// (the ideal for a batch statistic that needs a grid-wide result before the elementwise pass).
// Deterministic (fixed-order reductions, no atomics). fp64 goes to Triton. Unrun: no GPU yet.

#include "channel_norm.cuh"
#include "common.cuh"
#include "launch.h"

namespace fastnorm {
namespace {

// One thread per channel: merge the [splits][B * C] partials in (split, b) order.
__global__ void batch_norm_combine_stats_kernel(const float4* __restrict__ partial, int64_t splits,
                                                int64_t B, int64_t C, float* __restrict__ mean,
                                                float* __restrict__ var) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  MeanM2 acc{0.f, 0.f, 0.f};
  for (int64_t k = 0; k < splits * B; ++k) {
    const float4 p = partial[k * C + c];  // k = sp * B + b
    acc = chan_merge(acc, MeanM2{p.x, p.y, p.z});
  }
  mean[c] = acc.mean;
  var[c] = acc.n > 0.f ? fmaxf(acc.m2 / acc.n, 0.f) : 0.f;
}

__global__ void batch_norm_combine_sums_kernel(const float* __restrict__ p1,
                                               const float* __restrict__ p2, int64_t rows,
                                               int64_t C, float* __restrict__ sum_dy_xhat,
                                               float* __restrict__ sum_dy) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s1 = 0.f, s2 = 0.f;
  for (int64_t k = 0; k < rows; ++k) {
    s1 += p1[k * C + c];
    s2 += p2[k * C + c];
  }
  sum_dy_xhat[c] = s1;
  sum_dy[c] = s2;
}

// tab_a[c] = {mean, rstd, w, b}; with tab_b: {w * sum_dy_xhat / count, w * sum_dy / count}
// (training, sum_dy non-null) or zeros (eval).
template <typename PT>
__global__ void batch_norm_table_kernel(const float* __restrict__ mean,
                                        const float* __restrict__ var, const PT* __restrict__ w,
                                        const PT* __restrict__ b, int64_t C, float eps,
                                        const float* __restrict__ sum_dy,
                                        const float* __restrict__ sum_dy_xhat,
                                        const float* __restrict__ count,
                                        float4* __restrict__ tab_a, float2* __restrict__ tab_b) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float wc = w != nullptr ? to_float(w[c]) : 1.f;
  tab_a[c] = make_float4(mean[c], 1.f / sqrtf(var[c] + eps), wc,
                         b != nullptr ? to_float(b[c]) : 0.f);
  if (tab_b != nullptr) {
    if (sum_dy != nullptr) {
      const float n = count[0];
      tab_b[c] = make_float2(wc * (sum_dy_xhat[c] / n), wc * (sum_dy[c] / n));
    } else {
      tab_b[c] = make_float2(0.f, 0.f);
    }
  }
}

unsigned channel_blocks(int64_t C) { return unsigned(ceil_div(C, 256)); }

template <typename T>
int64_t partial_count(int64_t N, int64_t C, int64_t S, bool cl, int sms) {
  const int64_t splits = reduce_partial_rows<T>(cl, N, C, S, false, sms);
  return splits * (cl ? 1 : N) * C;
}

template <typename PT>
cudaError_t launch_table(const float* mean, const float* var, const void* w, const void* b,
                         int64_t C, float eps, const float* sum_dy, const float* sum_dy_xhat,
                         const float* count, float4* tab_a, float2* tab_b, cudaStream_t stream) {
  batch_norm_table_kernel<PT><<<channel_blocks(C), 256, 0, stream>>>(
      mean, var, static_cast<const PT*>(w), static_cast<const PT*>(b), C, eps, sum_dy,
      sum_dy_xhat, count, tab_a, tab_b);
  return cudaGetLastError();
}

// ---- the four building blocks, typed ----------------------------------------------------------

template <typename T>
cudaError_t stats_impl(const BatchNormStatsArgs& a, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  const int64_t np = partial_count<T>(a.N, a.C, a.S, a.channels_last, dev.sms);
  {
    Workspace count(nullptr);
    count.take<float4>(np);
    if (a.workspace_bytes < count.bytes()) return cudaErrorInvalidValue;
  }
  Workspace ws(a.workspace);
  float4* partial = ws.take<float4>(np);
  const T* x = static_cast<const T*>(a.x);
  int64_t B = 0, splits = 0;
  cudaError_t err = launch_reduce<T, false, Activation::kNone, false>(
      x, nullptr, a.N, a.C, a.S, a.channels_last, false, dev.sms, aligned16(x), nullptr, partial,
      nullptr, nullptr, &B, &splits, stream);
  if (err != cudaSuccess) return err;
  batch_norm_combine_stats_kernel<<<channel_blocks(a.C), 256, 0, stream>>>(partial, splits, B, a.C,
                                                                           a.mean, a.var);
  return cudaGetLastError();
}

template <typename T, typename PT>
cudaError_t apply_impl(const BatchNormApplyArgs& a, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  {
    Workspace count(nullptr);
    count.take<float4>(a.C);
    if (a.workspace_bytes < count.bytes()) return cudaErrorInvalidValue;
  }
  Workspace ws(a.workspace);
  float4* tab_a = ws.take<float4>(a.C);
  cudaError_t err = launch_table<PT>(a.mean, a.var, a.weight, a.bias, a.C, a.eps, nullptr, nullptr,
                                     nullptr, tab_a, nullptr, stream);
  if (err != cudaSuccess) return err;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  if (a.relu)
    return launch_elementwise<T, false, Activation::kRelu, false>(
        x, nullptr, y, a.N, a.C, a.S, a.channels_last, dev.sms, tab_a, nullptr, stream);
  return launch_elementwise<T, false, Activation::kNone, false>(
      x, nullptr, y, a.N, a.C, a.S, a.channels_last, dev.sms, tab_a, nullptr, stream);
}

template <typename T, typename PT>
cudaError_t bwd_reduce_impl(const BatchNormBwdReduceArgs& a, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  const int64_t np = partial_count<T>(a.N, a.C, a.S, a.channels_last, dev.sms);
  {
    Workspace count(nullptr);
    count.take<float4>(a.C);
    count.take<float>(np);
    count.take<float>(np);
    if (a.workspace_bytes < count.bytes()) return cudaErrorInvalidValue;
  }
  Workspace ws(a.workspace);
  float4* tab_a = ws.take<float4>(a.C);
  float* p1 = ws.take<float>(np);
  float* p2 = ws.take<float>(np);
  cudaError_t err = launch_table<PT>(a.mean, a.var, a.weight, a.bias, a.C, a.eps, nullptr, nullptr,
                                     nullptr, tab_a, nullptr, stream);
  if (err != cudaSuccess) return err;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const bool aligned = aligned16(x) && aligned16(dy);
  int64_t B = 0, splits = 0;
  if (a.relu)
    err = launch_reduce<T, true, Activation::kRelu, false>(x, dy, a.N, a.C, a.S, a.channels_last,
                                                           false, dev.sms, aligned, tab_a, nullptr,
                                                           p1, p2, &B, &splits, stream);
  else
    err = launch_reduce<T, true, Activation::kNone, false>(x, dy, a.N, a.C, a.S, a.channels_last,
                                                           false, dev.sms, aligned, tab_a, nullptr,
                                                           p1, p2, &B, &splits, stream);
  if (err != cudaSuccess) return err;
  batch_norm_combine_sums_kernel<<<channel_blocks(a.C), 256, 0, stream>>>(
      p1, p2, splits * B, a.C, a.sum_dy_xhat, a.sum_dy);
  return cudaGetLastError();
}

template <typename T, typename PT>
cudaError_t bwd_elemt_impl(const BatchNormBwdElemtArgs& a, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  {
    Workspace count(nullptr);
    count.take<float4>(a.C);
    count.take<float2>(a.C);
    if (a.workspace_bytes < count.bytes()) return cudaErrorInvalidValue;
  }
  Workspace ws(a.workspace);
  float4* tab_a = ws.take<float4>(a.C);
  float2* tab_b = ws.take<float2>(a.C);
  cudaError_t err = launch_table<PT>(a.mean, a.var, a.weight, a.bias, a.C, a.eps, a.sum_dy,
                                     a.sum_dy_xhat, a.count, tab_a, tab_b, stream);
  if (err != cudaSuccess) return err;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.dx);
  if (a.relu)
    return launch_elementwise<T, true, Activation::kRelu, false>(
        x, dy, dx, a.N, a.C, a.S, a.channels_last, dev.sms, tab_a, tab_b, stream);
  return launch_elementwise<T, true, Activation::kNone, false>(
      x, dy, dx, a.N, a.C, a.S, a.channels_last, dev.sms, tab_a, tab_b, stream);
}

template <typename Args>
Args with_param_dtype(const Args& a) {
  Args b = a;
  if (a.weight == nullptr && a.bias == nullptr) b.param_dtype = b.dtype;
  return b;
}

template <typename Args>
bool shape_ok(const Args& a) {
  return a.N >= 0 && a.C >= 0 && a.S >= 0;
}

template <typename F>
size_t typed_bytes(DType dtype, F&& f) {
  size_t bytes = 0;
  dispatch_type(dtype, [&](auto t) -> cudaError_t {
    bytes = f(t);
    return cudaSuccess;
  });
  return bytes;
}

}  // namespace

// ---- workspace sizes --------------------------------------------------------------------------

size_t batch_norm_stats_workspace_bytes(const BatchNormStatsArgs& a) {
  if (!shape_ok(a) || a.N * a.C * a.S == 0) return 0;
  return typed_bytes(a.dtype, [&](auto t) {
    Workspace ws(nullptr);
    ws.take<float4>(partial_count<typename decltype(t)::type>(a.N, a.C, a.S, a.channels_last,
                                                              current_device_info().sms));
    return ws.bytes();
  });
}

size_t batch_norm_apply_workspace_bytes(const BatchNormApplyArgs& a) {
  Workspace ws(nullptr);
  ws.take<float4>(a.C);
  return ws.bytes();
}

size_t batch_norm_bwd_reduce_workspace_bytes(const BatchNormBwdReduceArgs& a) {
  if (!shape_ok(a) || a.N * a.C * a.S == 0) return 0;
  return typed_bytes(a.dtype, [&](auto t) {
    const int64_t np = partial_count<typename decltype(t)::type>(a.N, a.C, a.S, a.channels_last,
                                                                 current_device_info().sms);
    Workspace ws(nullptr);
    ws.take<float4>(a.C);
    ws.take<float>(np);
    ws.take<float>(np);
    return ws.bytes();
  });
}

size_t batch_norm_bwd_elemt_workspace_bytes(const BatchNormBwdElemtArgs& a) {
  Workspace ws(nullptr);
  ws.take<float4>(a.C);
  ws.take<float2>(a.C);
  return ws.bytes();
}

size_t batch_norm_fwd_workspace_bytes(const BatchNormFwdArgs& a) {
  BatchNormStatsArgs s;
  s.dtype = a.dtype;
  s.N = a.N, s.C = a.C, s.S = a.S, s.channels_last = a.channels_last;
  BatchNormApplyArgs p;
  p.C = a.C;
  // The two passes run one after the other and reuse the same workspace.
  return std::max(batch_norm_stats_workspace_bytes(s), batch_norm_apply_workspace_bytes(p));
}

size_t batch_norm_bwd_workspace_bytes(const BatchNormBwdArgs& a) {
  BatchNormBwdReduceArgs r;
  r.dtype = a.dtype;
  r.N = a.N, r.C = a.C, r.S = a.S, r.channels_last = a.channels_last;
  BatchNormBwdElemtArgs e;
  e.C = a.C;
  // The count (N*S as a device float) lives in front; the passes share the rest.
  Workspace ws(nullptr);
  ws.take<float>(1);
  return ws.bytes() +
         std::max(batch_norm_bwd_reduce_workspace_bytes(r), batch_norm_bwd_elemt_workspace_bytes(e));
}

// ---- launchers --------------------------------------------------------------------------------

cudaError_t launch_batch_norm_stats(const BatchNormStatsArgs& a, cudaStream_t stream) {
  if (!shape_ok(a) || a.mean == nullptr || a.var == nullptr) return cudaErrorInvalidValue;
  if (a.N * a.C * a.S == 0) {  // a rank with no samples contributes nothing to a SyncBN merge
    cudaError_t err = launch_fill(a.mean, a.C, 0.f, stream);
    if (err != cudaSuccess) return err;
    return launch_fill(a.var, a.C, 0.f, stream);
  }
  return dispatch_type(a.dtype, [&](auto t) -> cudaError_t {
    return stats_impl<typename decltype(t)::type>(a, stream);
  });
}

cudaError_t launch_batch_norm_apply(const BatchNormApplyArgs& args, cudaStream_t stream) {
  if (!shape_ok(args)) return cudaErrorInvalidValue;
  if (args.N * args.C * args.S == 0) return cudaSuccess;
  const BatchNormApplyArgs a = with_param_dtype(args);
  return dispatch_types(a.dtype, a.param_dtype, [&](auto t, auto p) -> cudaError_t {
    return apply_impl<typename decltype(t)::type, typename decltype(p)::type>(a, stream);
  });
}

cudaError_t launch_batch_norm_bwd_reduce(const BatchNormBwdReduceArgs& args, cudaStream_t stream) {
  if (!shape_ok(args) || args.sum_dy == nullptr || args.sum_dy_xhat == nullptr)
    return cudaErrorInvalidValue;
  if (args.N * args.C * args.S == 0) {
    cudaError_t err = launch_fill(args.sum_dy, args.C, 0.f, stream);
    if (err != cudaSuccess) return err;
    return launch_fill(args.sum_dy_xhat, args.C, 0.f, stream);
  }
  const BatchNormBwdReduceArgs a = with_param_dtype(args);
  return dispatch_types(a.dtype, a.param_dtype, [&](auto t, auto p) -> cudaError_t {
    return bwd_reduce_impl<typename decltype(t)::type, typename decltype(p)::type>(a, stream);
  });
}

cudaError_t launch_batch_norm_bwd_elemt(const BatchNormBwdElemtArgs& args, cudaStream_t stream) {
  if (!shape_ok(args) || (args.sum_dy != nullptr &&
                          (args.sum_dy_xhat == nullptr || args.count == nullptr)))
    return cudaErrorInvalidValue;
  if (args.N * args.C * args.S == 0) return cudaSuccess;
  const BatchNormBwdElemtArgs a = with_param_dtype(args);
  return dispatch_types(a.dtype, a.param_dtype, [&](auto t, auto p) -> cudaError_t {
    return bwd_elemt_impl<typename decltype(t)::type, typename decltype(p)::type>(a, stream);
  });
}

cudaError_t launch_batch_norm_fwd(const BatchNormFwdArgs& a, cudaStream_t stream) {
  BatchNormStatsArgs s;
  s.dtype = a.dtype;
  s.x = a.x;
  s.mean = a.mean;
  s.var = a.var;
  s.N = a.N, s.C = a.C, s.S = a.S, s.channels_last = a.channels_last;
  s.workspace = a.workspace;
  s.workspace_bytes = a.workspace_bytes;
  cudaError_t err = launch_batch_norm_stats(s, stream);
  if (err != cudaSuccess) return err;
  BatchNormApplyArgs p;
  p.dtype = a.dtype;
  p.param_dtype = a.param_dtype;
  p.x = a.x;
  p.y = a.y;
  p.mean = a.mean;
  p.var = a.var;
  p.weight = a.weight;
  p.bias = a.bias;
  p.N = a.N, p.C = a.C, p.S = a.S, p.channels_last = a.channels_last;
  p.eps = a.eps;
  p.relu = a.relu;
  p.workspace = a.workspace;
  p.workspace_bytes = a.workspace_bytes;
  return launch_batch_norm_apply(p, stream);
}

cudaError_t launch_batch_norm_bwd(const BatchNormBwdArgs& a, cudaStream_t stream) {
  if (a.workspace_bytes < batch_norm_bwd_workspace_bytes(a)) return cudaErrorInvalidValue;
  Workspace ws(a.workspace);
  float* count = ws.take<float>(1);
  void* rest = a.workspace == nullptr ? nullptr : static_cast<char*>(a.workspace) + ws.bytes();
  const size_t rest_bytes = a.workspace_bytes - ws.bytes();
  BatchNormBwdReduceArgs r;
  r.dtype = a.dtype;
  r.param_dtype = a.param_dtype;
  r.dy = a.dy;
  r.x = a.x;
  r.mean = a.mean;
  r.var = a.var;
  r.weight = a.weight;
  r.bias = a.bias;
  r.sum_dy = a.sum_dy;
  r.sum_dy_xhat = a.sum_dy_xhat;
  r.N = a.N, r.C = a.C, r.S = a.S, r.channels_last = a.channels_last;
  r.eps = a.eps;
  r.relu = a.relu;
  r.workspace = rest;
  r.workspace_bytes = rest_bytes;
  cudaError_t err = launch_batch_norm_bwd_reduce(r, stream);
  if (err != cudaSuccess) return err;
  if (a.training) {
    err = launch_fill(count, 1, float(a.N * a.S), stream);
    if (err != cudaSuccess) return err;
  }
  BatchNormBwdElemtArgs e;
  e.dtype = a.dtype;
  e.param_dtype = a.param_dtype;
  e.dy = a.dy;
  e.x = a.x;
  e.mean = a.mean;
  e.var = a.var;
  e.weight = a.weight;
  e.bias = a.bias;
  e.sum_dy = a.training ? a.sum_dy : nullptr;
  e.sum_dy_xhat = a.training ? a.sum_dy_xhat : nullptr;
  e.count = a.training ? count : nullptr;
  e.dx = a.dx;
  e.N = a.N, e.C = a.C, e.S = a.S, e.channels_last = a.channels_last;
  e.eps = a.eps;
  e.relu = a.relu;
  e.workspace = rest;
  e.workspace_bytes = rest_bytes;
  return launch_batch_norm_bwd_elemt(e, stream);
}

}  // namespace fastnorm
