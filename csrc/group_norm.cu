// GroupNorm forward / backward on an (N, C, HW) view, NCHW or channels-last, with optional fused
// SiLU. Torch-free; entry points in launch.h. The contract of fastnorm/triton/group_norm.py:
// mean / rstd fp32 [N, G], rstd = 1/sqrt(biased var + eps), y = act((x - mean) * rstd * w + b),
//   dz = dy * act'(z) (SiLU: silu'(z) = s + z s (1 - s), z recomputed from x_hat),
//   dx = rstd * (w dz - x_hat c1 - c2), c1 = mean_group(w dz x_hat), c2 = mean_group(w dz),
//   dweight = sum_{n,s} dz x_hat, dbias = sum_{n,s} dz.
//
// Kernels (channel_norm.cuh holds the shared ones):
// Forward, 4 launches:
//   1. reduce: per (n, c, spatial split) partial (count, mean, M2) from per-thread shifted sums
//      merged with Chan's formula. NCHW: one block per (row n*C + c, split), 16-byte loads when
//      HW is a multiple of the pack width; channels-last: blocks of 32 channels x 8 row-threads
//      walking the (HW, C) matrix of one sample (coalesced across channels). Splits make
//      N*C*splits blocks fill the device when N*C is small.
//   2. combine: one warp per (n, g) merges the C/G x splits partials in a fixed order (Chan), writes
//      mean / rstd and the per-(n, c) table {mean, rstd, w, b}.
//   3. elementwise: y = act(((x - mean) * rstd) * w + b), 16-byte packs where the layout allows.
// Backward, 5 launches: table {mean, rstd, w, b}; reduce P1 = sum dz x_hat, P2 = sum dz per
//   (split, n, c); combine per (n, g) into c1, c2 (a warp, lane-strided then butterfly); the
//   [splits * N, C] partials summed per channel in row order (column_sum_kernel) for dweight /
//   dbias; elementwise dx.
// Per-sample gradient norms (group_norm_bwd_pe, an example = a sample n): the reduce partials are
//   already per sample, so one more small kernel (group_norm_sample_sq_kernel, a block per n)
//   adds sample n's splits per channel in split order, squares and sums over channels; x and dy
//   are not read again and dx / dweight / dbias are untouched.
// HBM traffic: forward reads x twice (reduce, apply; the second read hits L2 only for tensors
// that fit) and writes y once; backward reads x and dy twice and writes dx. Partials and tables
// are O(N * C * splits) floats. Everything is fixed-order: deterministic, no atomics.
// fp64 is not handled here (the router sends it to Triton). Unrun: no GPU has executed it yet.

#include "channel_norm.cuh"
#include "common.cuh"
#include "launch.h"
#include "reduce.cuh"

namespace fastnorm {
namespace {

constexpr int kCombineWarps = 4;

// One warp per (n, g): merge partials [sp][n*C + c], c in the group, in (sp, c) order per lane,
// lanes by a shuffle tree; then write mean / rstd and the group's table entries.
template <typename PT>
__global__ void __launch_bounds__(32 * kCombineWarps)
    group_norm_combine_fwd_kernel(const float4* __restrict__ partial, int64_t splits, int64_t N,
                                  int64_t C, int64_t G, float eps, const PT* __restrict__ w,
                                  const PT* __restrict__ b, float* __restrict__ mean,
                                  float* __restrict__ rstd, float4* __restrict__ tab_a) {
  const int64_t ng = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (ng >= N * G) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const int64_t n = ng / G, g = ng % G, cg = C / G;
  MeanM2 acc{0.f, 0.f, 0.f};
  for (int64_t k = lane; k < splits * cg; k += 32) {
    const int64_t sp = k / cg, c = g * cg + k % cg;
    const float4 p = partial[sp * N * C + n * C + c];
    acc = chan_merge(acc, MeanM2{p.x, p.y, p.z});
  }
  const MeanM2 st = warp_merge(acc);
  const float m = st.mean;
  const float r = 1.f / sqrtf(fmaxf(st.m2 / st.n, 0.f) + eps);
  if (lane == 0) {
    mean[ng] = m;
    rstd[ng] = r;
  }
  for (int64_t j = lane; j < cg; j += 32) {
    const int64_t c = g * cg + j;
    tab_a[n * C + c] = make_float4(m, r, w != nullptr ? to_float(w[c]) : 1.f,
                                   b != nullptr ? to_float(b[c]) : 0.f);
  }
}

template <typename PT>
__global__ void group_norm_table_kernel(const float* __restrict__ mean,
                                        const float* __restrict__ rstd, const PT* __restrict__ w,
                                        const PT* __restrict__ b, int64_t N, int64_t C, int64_t G,
                                        float4* __restrict__ tab_a) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C;
  const int64_t ng = n * G + c / (C / G);
  tab_a[i] = make_float4(mean[ng], rstd[ng], w != nullptr ? to_float(w[c]) : 1.f,
                         b != nullptr ? to_float(b[c]) : 0.f);
}

// One warp per (n, g): c1 = sum w[c] P1 / count, c2 = sum w[c] P2 / count over the group's
// channels and all splits, then the group's table entries {c1, c2}.
template <typename PT>
__global__ void __launch_bounds__(32 * kCombineWarps)
    group_norm_combine_bwd_kernel(const float* __restrict__ p1, const float* __restrict__ p2,
                                  int64_t splits, int64_t N, int64_t C, int64_t G, int64_t HW,
                                  const PT* __restrict__ w, float2* __restrict__ tab_b) {
  const int64_t ng = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (ng >= N * G) return;
  const int lane = threadIdx.x & 31;
  const int64_t n = ng / G, g = ng % G, cg = C / G;
  float2 s = make_float2(0.f, 0.f);
  for (int64_t k = lane; k < splits * cg; k += 32) {
    const int64_t sp = k / cg, c = g * cg + k % cg;
    const int64_t idx = sp * N * C + n * C + c;
    const float wc = w != nullptr ? to_float(w[c]) : 1.f;
    s.x += wc * p1[idx];
    s.y += wc * p2[idx];
  }
  s = warp_sum(s);
  const float count = float(cg) * float(HW);
  const float2 cc = make_float2(s.x / count, s.y / count);
  for (int64_t j = lane; j < cg; j += 32) tab_b[n * C + g * cg + j] = cc;
}

// Block per sample n: dweight_sq[n] = sum_c (sum_sp p1[sp][n, c])^2, dbias_sq likewise from p2.
__global__ void __launch_bounds__(256)
    group_norm_sample_sq_kernel(const float* __restrict__ p1, const float* __restrict__ p2,
                                int64_t splits, int64_t N, int64_t C,
                                float* __restrict__ dweight_sq, float* __restrict__ dbias_sq) {
  __shared__ float2 slots[8];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    float2 sq = make_float2(0.f, 0.f);
    for (int64_t c = threadIdx.x; c < C; c += 256) {
      float w = 0.f, b = 0.f;
      for (int64_t sp = 0; sp < splits; ++sp) {
        w += p1[sp * N * C + n * C + c];
        b += p2[sp * N * C + n * C + c];
      }
      sq.x += w * w;
      sq.y += b * b;
    }
    sq = block_sum<8>(sq, slots);
    if (threadIdx.x == 0) {
      if (dweight_sq != nullptr) dweight_sq[n] = sq.x;
      if (dbias_sq != nullptr) dbias_sq[n] = sq.y;
    }
  }
}

unsigned combine_blocks(int64_t N, int64_t G) {
  return unsigned(ceil_div(N * G, kCombineWarps));
}

// Workspace pieces, in this order (the sizes function runs the same code with a null base).
struct FwdSpace {
  float4* tab_a;
  float4* partial;
};
template <typename T>
FwdSpace fwd_space(Workspace& ws, const GroupNormFwdArgs& a, int sms) {
  const int64_t splits = reduce_partial_rows<T>(a.channels_last, a.N, a.C, a.HW, true, sms);
  FwdSpace s;
  s.tab_a = ws.take<float4>(a.N * a.C);
  s.partial = ws.take<float4>(splits * a.N * a.C);
  return s;
}

struct BwdSpace {
  float4* tab_a;
  float2* tab_b;
  float* p1;
  float* p2;
};
template <typename T>
BwdSpace bwd_space(Workspace& ws, const GroupNormBwdArgs& a, int sms) {
  const int64_t splits = reduce_partial_rows<T>(a.channels_last, a.N, a.C, a.HW, true, sms);
  BwdSpace s;
  s.tab_a = ws.take<float4>(a.N * a.C);
  s.tab_b = ws.take<float2>(a.N * a.C);
  s.p1 = ws.take<float>(splits * a.N * a.C);
  s.p2 = ws.take<float>(splits * a.N * a.C);
  return s;
}

template <typename T, typename PT, Activation ACT>
cudaError_t group_norm_fwd_impl(const GroupNormFwdArgs& a, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  {
    Workspace count(nullptr);
    fwd_space<T>(count, a, dev.sms);
    if (a.workspace_bytes < count.bytes()) return cudaErrorInvalidValue;
  }
  Workspace ws(a.workspace);
  const FwdSpace sp = fwd_space<T>(ws, a, dev.sms);
  const T* x = static_cast<const T*>(a.x);
  int64_t B = 0, splits = 0;
  cudaError_t err = launch_reduce<T, false, Activation::kNone, true>(
      x, nullptr, a.N, a.C, a.HW, a.channels_last, true, dev.sms, aligned16(x), nullptr,
      sp.partial, nullptr, nullptr, &B, &splits, stream);
  if (err != cudaSuccess) return err;
  group_norm_combine_fwd_kernel<PT><<<combine_blocks(a.N, a.G), 32 * kCombineWarps, 0, stream>>>(
      sp.partial, splits, a.N, a.C, a.G, a.eps, static_cast<const PT*>(a.weight),
      static_cast<const PT*>(a.bias), a.mean, a.rstd, sp.tab_a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_elementwise<T, false, ACT, true>(x, nullptr, static_cast<T*>(a.y), a.N, a.C, a.HW,
                                                 a.channels_last, dev.sms, sp.tab_a, nullptr,
                                                 stream);
}

template <typename T, typename PT, Activation ACT>
cudaError_t group_norm_bwd_impl(const GroupNormBwdArgs& a, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  {
    Workspace count(nullptr);
    bwd_space<T>(count, a, dev.sms);
    if (a.workspace_bytes < count.bytes()) return cudaErrorInvalidValue;
  }
  Workspace ws(a.workspace);
  const BwdSpace sp = bwd_space<T>(ws, a, dev.sms);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const PT* w = static_cast<const PT*>(a.weight);
  group_norm_table_kernel<PT><<<unsigned(ceil_div(a.N * a.C, 256)), 256, 0, stream>>>(
      a.mean, a.rstd, w, static_cast<const PT*>(a.bias), a.N, a.C, a.G, sp.tab_a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  int64_t B = 0, splits = 0;
  err = launch_reduce<T, true, ACT, true>(x, dy, a.N, a.C, a.HW, a.channels_last, true, dev.sms,
                                          aligned16(x) && aligned16(dy), sp.tab_a, nullptr, sp.p1,
                                          sp.p2, &B, &splits, stream);
  if (err != cudaSuccess) return err;
  group_norm_combine_bwd_kernel<PT><<<combine_blocks(a.N, a.G), 32 * kCombineWarps, 0, stream>>>(
      sp.p1, sp.p2, splits, a.N, a.C, a.G, a.HW, w, sp.tab_b);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // Partials [splits][N * C] are a [splits * N, C] matrix: its column sums are dweight / dbias.
  err = launch_column_sum(sp.p1, splits * a.N, a.C, static_cast<PT*>(a.dweight), stream);
  if (err != cudaSuccess) return err;
  err = launch_column_sum(sp.p2, splits * a.N, a.C, static_cast<PT*>(a.dbias), stream);
  if (err != cudaSuccess) return err;
  if (a.dweight_sq != nullptr || a.dbias_sq != nullptr) {
    group_norm_sample_sq_kernel<<<unsigned(std::min(a.N, kMaxGridX)), 256, 0, stream>>>(
        sp.p1, sp.p2, splits, a.N, a.C, a.dweight_sq, a.dbias_sq);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return launch_elementwise<T, true, ACT, true>(x, dy, static_cast<T*>(a.dx), a.N, a.C, a.HW,
                                                a.channels_last, dev.sms, sp.tab_a, sp.tab_b,
                                                stream);
}

template <typename Args>
bool gn_args_ok(const Args& a) {
  return a.N >= 0 && a.C >= 0 && a.HW >= 0 && a.G >= 1 && a.C % a.G == 0 &&
         (a.activation == Activation::kNone || a.activation == Activation::kSilu);
}

template <typename Args>
Args with_param_dtype(const Args& a) {
  Args b = a;
  if (a.weight == nullptr && a.bias == nullptr) b.param_dtype = b.dtype;
  return b;
}

}  // namespace

size_t group_norm_fwd_workspace_bytes(const GroupNormFwdArgs& args) {
  if (!gn_args_ok(args) || args.N * args.C * args.HW == 0) return 0;
  size_t bytes = 0;
  dispatch_type(args.dtype, [&](auto t) -> cudaError_t {
    Workspace ws(nullptr);
    fwd_space<typename decltype(t)::type>(ws, args, current_device_info().sms);
    bytes = ws.bytes();
    return cudaSuccess;
  });
  return bytes;
}

size_t group_norm_bwd_workspace_bytes(const GroupNormBwdArgs& args) {
  if (!gn_args_ok(args) || args.N * args.C * args.HW == 0) return 0;
  size_t bytes = 0;
  dispatch_type(args.dtype, [&](auto t) -> cudaError_t {
    Workspace ws(nullptr);
    bwd_space<typename decltype(t)::type>(ws, args, current_device_info().sms);
    bytes = ws.bytes();
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t launch_group_norm_fwd(const GroupNormFwdArgs& args, cudaStream_t stream) {
  if (!gn_args_ok(args)) return cudaErrorInvalidValue;
  if (args.N == 0 || args.C == 0) return cudaSuccess;
  if (args.HW == 0) {  // as torch's native_group_norm: zero mean, NaN rstd, empty output
    cudaError_t err = launch_fill(args.mean, args.N * args.G, 0.f, stream);
    if (err != cudaSuccess) return err;
    return launch_fill(args.rstd, args.N * args.G, __builtin_nanf(""), stream);
  }
  const GroupNormFwdArgs a = with_param_dtype(args);
  return dispatch_types(a.dtype, a.param_dtype, [&](auto t, auto p) -> cudaError_t {
    using T = typename decltype(t)::type;
    using PT = typename decltype(p)::type;
    if (a.activation == Activation::kSilu)
      return group_norm_fwd_impl<T, PT, Activation::kSilu>(a, stream);
    return group_norm_fwd_impl<T, PT, Activation::kNone>(a, stream);
  });
}

cudaError_t launch_group_norm_bwd(const GroupNormBwdArgs& args, cudaStream_t stream) {
  if (!gn_args_ok(args)) return cudaErrorInvalidValue;
  const GroupNormBwdArgs a = with_param_dtype(args);
  return dispatch_types(a.dtype, a.param_dtype, [&](auto t, auto p) -> cudaError_t {
    using T = typename decltype(t)::type;
    using PT = typename decltype(p)::type;
    if (a.N * a.C * a.HW == 0) {  // empty: zero parameter gradients, empty dx
      cudaError_t err = launch_column_sum<PT>(nullptr, 0, a.C, static_cast<PT*>(a.dweight), stream);
      if (err != cudaSuccess) return err;
      err = launch_column_sum<PT>(nullptr, 0, a.C, static_cast<PT*>(a.dbias), stream);
      if (err != cudaSuccess) return err;
      err = launch_fill(a.dweight_sq, a.N, 0.f, stream);  // per-sample norms of empty sums
      if (err != cudaSuccess) return err;
      return launch_fill(a.dbias_sq, a.N, 0.f, stream);
    }
    if (a.activation == Activation::kSilu)
      return group_norm_bwd_impl<T, PT, Activation::kSilu>(a, stream);
    return group_norm_bwd_impl<T, PT, Activation::kNone>(a, stream);
  });
}

}  // namespace fastnorm
