// LayerNorm and RMSNorm, forward and backward, on a 2-D view (M rows of N features, unit column
// stride). Torch-free; the host launchers at the bottom are the only entry points (launch.h).
//
// Numerics (the contract of fastnorm/triton/layer_norm.py): statistics in fp32, saved mean/rstd
// fp32 [M] (mean unused for RMS), rstd = 1/sqrt(var + eps) with the biased variance.
//   forward   y  = (x - mean) * rstd * w + b                (RMS: x * rstd * w)
//   backward  dx = rstd * (w*dy - (x_hat * c1 + c2)), c1 = mean(x_hat * w*dy), c2 = mean(w*dy)
//             (c2 = 0 for RMS); dW = sum_rows dy * x_hat, dB = sum_rows dy.
//
// Paths (chosen per call by the launcher):
// 1. Register path (all pointers 16-byte aligned, N and the row strides multiples of the 16-byte
//    pack width, N <= 32768 forward / 8192 backward): a warp (N <= 1024) or one block (up to
//    1024 threads) per row holds the row in registers as 16-byte packs (ld.global.v4), E elements
//    per thread. Forward statistics are two-pass from registers: mean0 = sum/N, then one reduction
//    of (sum d, sum d^2) with d = x - mean0 gives mean = mean0 + sum d / N and
//    var = sum d^2 / N - (sum d / N)^2 (the same correction the Triton fused kernel applies; exact
//    at large means). HBM traffic: forward one read of x, one write of y (+ w, b from L2);
//    backward one read of x and dy, one write of dx. dW/dB: each row slot (a warp or a block)
//    keeps fp32 accumulators for its columns in registers over its contiguous chunk of
//    ceil(M / slots) rows and writes one row of [slots, N] partials; column_sum_kernel adds them
//    in slot order. Deterministic (fixed slots for a given device), no atomics.
//
// Per-example mode (layer_norm_bwd_pe, args.rows_per_example = R > 0: an example is R
// consecutive rows): the same kernels with the same plan, so dx / dW / dB are bitwise those of
// the plain mode. Each example's dW / dB contribution is summed over its rows *before* squaring:
//  - register path, same pass: the row kernel (template flag PE) keeps a second set of
//    accumulators for the current example; an example inside one slot's chunk is squared and
//    reduced there, one crossing chunk boundaries leaves a "head" / "tail" partial row per slot
//    (at most two per slot) that pe_split_sq_kernel adds in slot order before squaring;
//  - cluster and fallback paths: after the plain kernels, one more pass over x and dy
//    (layer_norm_bwd_param_partial_kernel with SQ: a thread per column sums an example's rows,
//    squares, a warp adds its 32 columns) and pe_colblock_sq_kernel adds the warps in column
//    order. Fixed order everywhere, no atomics.
// 2. Cluster path (sm_90 only, same alignment conditions, 32768 < N <= 262144 forward,
//    8192 < N <= 131072 backward): a thread-block cluster of up to 8 CTAs owns a row, each CTA a
//    contiguous slice held in registers. Per-CTA statistics (two-pass as above) are published in
//    shared memory and merged in rank order through distributed shared memory (Chan's formula for
//    (count, mean, M2); plain sums for RMS and for the backward's c1/c2), so the row never leaves
//    the chip: one HBM read of x and one write of y forward, x + dy in and dx out backward. The
//    backward keeps its dW/dB accumulators in shared memory (each thread owns fixed entries, so
//    no barriers), persistent clusters walk rows cluster, + clusters, ... and write one partial
//    row each. Launched with cudaLaunchKernelEx and a cluster-dimension attribute (no
//    __cluster_dims__, which does not compile for sm_80), only when the device is sm_90+ and the
//    kernel's binary was built for sm_90+ (otherwise its body would be the empty sm_80 stub).
// 3. Fallback (misaligned or odd-sized inputs, longer rows, or no cluster support): one block of
//    512 threads per row, scalar coalesced loads. Forward: per-thread shifted sums merged with
//    Chan's formula over the block, then a second walk normalizes (x read twice; the second read
//    often hits L2). Backward: a row kernel (c1, c2 reduction, then dx: x and dy read twice) and a
//    column kernel for dW/dB (x and dy read once more) with [groups, N] partials.
//
// Unrun: no GPU has executed these kernels yet (see csrc/README.md).

#include "common.cuh"
#include "launch.h"
#include "reduce.cuh"
#include "vec.cuh"
#include "welford.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#endif

namespace fastnorm {
namespace {

// Largest rows per path (elements).
constexpr int64_t kRegMaxNFwd = 32768;
constexpr int64_t kRegMaxNBwd = 8192;
constexpr int kMaxClusterSize = 8;  // portable cluster size
constexpr int kFallbackThreads = 512;

template <typename T>
__device__ __forceinline__ Pack<T> zero_pack() {
  Pack<T> p;
#pragma unroll
  for (int k = 0; k < Pack<T>::kWidth; ++k) p.v[k] = from_float<T>(0.f);
  return p;
}

// Sum over the threads that own one row: a warp (TPR == 32) or the whole block.
template <int TPR>
__device__ __forceinline__ float2 row_sum(float2 v, float2* slots) {
  if constexpr (TPR == 32) {
    return warp_sum(v);
  } else {
    return block_sum<TPR / 32>(v, slots);
  }
}

// Mean and rstd of the E-per-thread register tile `xv` (invalid packs are zero), two-pass.
// `n_valid_packs`: packs j < n_valid_packs of this thread are inside the row.
template <typename T, int TPR, int VPT>
__device__ __forceinline__ float2 tile_stats(const Pack<T> (&xv)[VPT], int n_valid_packs,
                                             int64_t n, bool is_rms, float eps, float2* slots) {
  constexpr int V = Pack<T>::kWidth;
  const float nf = float(n);
  if (is_rms) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float v = to_float(xv[j].v[k]);
        ss += v * v;
      }
    ss = row_sum<TPR>(make_float2(ss, 0.f), slots).x;
    return make_float2(0.f, 1.f / sqrtf(ss / nf + eps));
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j)
#pragma unroll
    for (int k = 0; k < V; ++k) s += to_float(xv[j].v[k]);
  const float mean0 = row_sum<TPR>(make_float2(s, 0.f), slots).x / nf;
  float2 d = make_float2(0.f, 0.f);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    if (j < n_valid_packs) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float dv = to_float(xv[j].v[k]) - mean0;
        d.x += dv;
        d.y += dv * dv;
      }
    }
  }
  d = row_sum<TPR>(d, slots);
  const float dm = d.x / nf;
  const float var = fmaxf(d.y / nf - dm * dm, 0.f);
  return make_float2(mean0 + dm, 1.f / sqrtf(var + eps));
}

// ---- register path -------------------------------------------------------------------------

// TPR threads per row, RPB rows per block (RPB > 1 only for TPR == 32), E elements per thread.
// Forward: at least 1024 resident threads per SM (<= 64 registers): with one row per block and
// barriers in every row, a second block per SM is what overlaps one row's loads with another's
// reductions and stores.
template <typename T, typename PT, int TPR, int RPB, int E>
__global__ void __launch_bounds__(TPR * RPB, (TPR * RPB >= 1024 ? 1 : 1024 / (TPR * RPB)))
    layer_norm_fwd_kernel(LayerNormFwdArgs a) {
  constexpr int V = Pack<T>::kWidth;
  constexpr int VPT = E / V;
  static_assert(E % V == 0 && (TPR == 32 || RPB == 1), "bad configuration");
  __shared__ float2 slots[32];
  const int lane = threadIdx.x % TPR;
  const int r = threadIdx.x / TPR;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ y = static_cast<T*>(a.y);
  const PT* __restrict__ w = static_cast<const PT*>(a.weight);
  const PT* __restrict__ b = a.is_rms ? nullptr : static_cast<const PT*>(a.bias);
  const int64_t n = a.N;
  // Packs j < n_valid of this thread lie inside the row (N is a multiple of V here).
  const int64_t packs_in_row = n / V;
  int n_valid = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j) n_valid += (int64_t(j) * TPR + lane < packs_in_row) ? 1 : 0;

  for (int64_t row = int64_t(blockIdx.x) * RPB + r; row < a.M; row += int64_t(gridDim.x) * RPB) {
    const T* xr = x + row * a.x_row_stride;
    Pack<T> xv[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      xv[j] = j < n_valid ? load_pack(xr + (int64_t(j) * TPR + lane) * V) : zero_pack<T>();
    const float2 st = tile_stats<T, TPR, VPT>(xv, n_valid, n, a.is_rms, a.eps, slots);
    const float mean = st.x, rstd = st.y;
    if (lane == 0) {
      if (!a.is_rms) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    T* yr = y + row * a.y_row_stride;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (j < n_valid) {
        const int64_t col = (int64_t(j) * TPR + lane) * V;
        float wv[V], bv[V];
        if (w != nullptr) load_params<V>(w + col, wv);
        if (b != nullptr) load_params<V>(b + col, bv);
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          float v = (to_float(xv[j].v[k]) - mean) * rstd;
          if (w != nullptr) v *= wv[k];
          if (b != nullptr) v += bv[k];
          out.v[k] = from_float<T>(v);
        }
        store_pack(yr + col, out);
      }
    }
  }
}

// Backward: x, dy and the dW/dB accumulators need more registers; >= 512 threads per SM.
// Row slot s owns the contiguous rows [s * rps, (s + 1) * rps), rps = ceil(M / slots) (contiguous
// so that an example's rows are together). PE (per-example mode, a.rows_per_example = R > 0):
// the slot also sums the current example's dy * x_hat and dy in a second set of accumulators,
// kept in dynamic shared memory (pe_smem_bytes; [2][E][threads], each thread only its own
// entries, so no barriers and no bank conflicts): in registers they would spill at the 128
// registers this launch bound allows. dw_acc / db_acc and dx are computed exactly as without PE. When its rows of an example end:
// an example wholly inside the slot is squared and reduced over the row's threads here and
// written to a.dweight_sq / a.dbias_sq (only this slot touches it); an example that crosses a
// slot boundary is written as one partial row of seg_w / seg_b [2 * slots, N]: row 2s for the
// slot's first example ("head"), 2s + 1 for its last ("tail"), and pe_split_sq_kernel adds those
// rows in slot order, squares and sums them. Fixed order throughout, no atomics.
template <typename T, typename PT, int TPR, int RPB, int E, bool PE>
__global__ void __launch_bounds__(TPR * RPB, (TPR * RPB >= 512 ? 1 : 512 / (TPR * RPB)))
    layer_norm_bwd_kernel(LayerNormBwdArgs a, float* __restrict__ dw_partial,
                          float* __restrict__ db_partial, float* __restrict__ seg_w,
                          float* __restrict__ seg_b) {
  constexpr int V = Pack<T>::kWidth;
  constexpr int VPT = E / V;
  static_assert(E % V == 0 && V % 4 == 0 && (TPR == 32 || RPB == 1), "bad configuration");
  __shared__ float2 slots[32];
  const int lane = threadIdx.x % TPR;
  const int64_t slot = int64_t(blockIdx.x) * RPB + threadIdx.x / TPR;
  const int64_t num_slots = int64_t(gridDim.x) * RPB;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  const PT* __restrict__ w = static_cast<const PT*>(a.weight);
  const int64_t n = a.N;
  const float nf = float(n);
  const int64_t packs_in_row = n / V;
  int n_valid = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j) n_valid += (int64_t(j) * TPR + lane < packs_in_row) ? 1 : 0;

  float dw_acc[VPT][V], db_acc[VPT][V];
#pragma unroll
  for (int j = 0; j < VPT; ++j)
#pragma unroll
    for (int k = 0; k < V; ++k) dw_acc[j][k] = db_acc[j][k] = 0.f;
  // PE: the current example's sums, entry (j, k) of this thread at [(j * V + k) * threads + tid].
  extern __shared__ float pe_smem[];
  float* const ew_acc = pe_smem + threadIdx.x;
  float* const eb_acc = pe_smem + E * TPR * RPB + threadIdx.x;
  constexpr int kStride = TPR * RPB;
  if constexpr (PE) {
#pragma unroll
    for (int i = 0; i < E; ++i) ew_acc[i * kStride] = eb_acc[i * kStride] = 0.f;
  }

  const int64_t rps = (a.M + num_slots - 1) / num_slots;  // as on the host (ceil_div)
  const int64_t row_begin = min(a.M, slot * rps);
  const int64_t row_end = min(a.M, row_begin + rps);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* xr = x + row * a.x_row_stride;
    const T* dyr = dy + row * a.dy_row_stride;
    Pack<T> xv[VPT], gv[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t col = (int64_t(j) * TPR + lane) * V;
      xv[j] = j < n_valid ? load_pack(xr + col) : zero_pack<T>();
      gv[j] = j < n_valid ? load_pack(dyr + col) : zero_pack<T>();
    }
    const float mean = a.is_rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (j < n_valid) {
        float wv[V];
        if (w != nullptr) load_params<V>(w + (int64_t(j) * TPR + lane) * V, wv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float xh = (to_float(xv[j].v[k]) - mean) * rstd;
          const float g = w != nullptr ? to_float(gv[j].v[k]) * wv[k] : to_float(gv[j].v[k]);
          s.x += xh * g;
          s.y += g;
        }
      }
    }
    s = row_sum<TPR>(s, slots);
    const float c1 = s.x / nf;
    const float c2 = a.is_rms ? 0.f : s.y / nf;
    T* dxr = dx + row * a.dx_row_stride;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (j < n_valid) {
        const int64_t col = (int64_t(j) * TPR + lane) * V;
        float wv[V];
        if (w != nullptr) load_params<V>(w + col, wv);
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float xh = (to_float(xv[j].v[k]) - mean) * rstd;
          const float d = to_float(gv[j].v[k]);
          const float g = w != nullptr ? d * wv[k] : d;
          out.v[k] = from_float<T>((g - (xh * c1 + c2)) * rstd);
          dw_acc[j][k] += d * xh;
          db_acc[j][k] += d;
          if constexpr (PE) {
            ew_acc[(j * V + k) * kStride] += d * xh;
            eb_acc[(j * V + k) * kStride] += d;
          }
        }
        store_pack(dxr + col, out);
      }
    }
    if constexpr (PE) {
      const int64_t rpe = a.rows_per_example;
      if ((row + 1) % rpe == 0 || row + 1 == row_end) {  // this slot's rows of the example end
        const int64_t ex = row / rpe;
        if (ex * rpe >= row_begin && (ex + 1) * rpe <= row_end) {
          float2 sq = make_float2(0.f, 0.f);
#pragma unroll
          for (int i = 0; i < E; ++i) {
            const float w = ew_acc[i * kStride], b = eb_acc[i * kStride];
            sq.x += w * w;
            sq.y += b * b;
          }
          sq = row_sum<TPR>(sq, slots);
          if (lane == 0) {
            if (a.dweight_sq != nullptr) a.dweight_sq[ex] = sq.x;
            if (a.dbias_sq != nullptr) a.dbias_sq[ex] = sq.y;
          }
        } else {
          const int64_t seg = 2 * slot + (ex == row_begin / rpe ? 0 : 1);
#pragma unroll
          for (int j = 0; j < VPT; ++j) {
            if (j < n_valid) {
              const int64_t col = (int64_t(j) * TPR + lane) * V;
#pragma unroll
              for (int k = 0; k < V; ++k) {
                const int i = (j * V + k) * kStride;
                if (a.dweight_sq != nullptr) seg_w[seg * n + col + k] = ew_acc[i];
                if (a.dbias_sq != nullptr) seg_b[seg * n + col + k] = eb_acc[i];
              }
            }
          }
        }
#pragma unroll
        for (int i = 0; i < E; ++i) ew_acc[i * kStride] = eb_acc[i * kStride] = 0.f;
      }
    }
  }
  // One partial row per slot; V is a multiple of 4 and N of V, so float4 stores are aligned.
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    if (j < n_valid) {
      const int64_t col = (int64_t(j) * TPR + lane) * V;
#pragma unroll
      for (int q = 0; q < V / 4; ++q) {
        if (dw_partial != nullptr)
          *reinterpret_cast<float4*>(dw_partial + slot * n + col + 4 * q) = make_float4(
              dw_acc[j][4 * q], dw_acc[j][4 * q + 1], dw_acc[j][4 * q + 2], dw_acc[j][4 * q + 3]);
        if (db_partial != nullptr)
          *reinterpret_cast<float4*>(db_partial + slot * n + col + 4 * q) = make_float4(
              db_acc[j][4 * q], db_acc[j][4 * q + 1], db_acc[j][4 * q + 2], db_acc[j][4 * q + 3]);
      }
    }
  }
}

// ---- cluster path (sm_90) --------------------------------------------------------------------
// Grid: num_clusters * cluster_size CTAs of TPR threads; CTA rank r of a cluster owns columns
// [r * slice, min((r + 1) * slice, N)), slice a multiple of V and <= TPR * E.

template <typename T, typename PT, int TPR, int E>
__global__ void __launch_bounds__(TPR, TPR >= 1024 ? 1 : 2)  // two 512-thread CTAs per SM
    layer_norm_fwd_cluster_kernel(LayerNormFwdArgs a, int64_t slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int V = Pack<T>::kWidth;
  constexpr int VPT = E / V;
  __shared__ float2 slots[32];
  __shared__ MeanM2 published[2];  // double-buffered by row parity
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank());
  const int cluster_size = int(cluster.num_blocks());
  const int64_t cluster_id = blockIdx.x / cluster_size;
  const int64_t num_clusters = gridDim.x / cluster_size;
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t(rank) * slice;
  const int64_t n_local = max(int64_t(0), min(slice, a.N - col0));
  const int64_t packs_local = n_local / V;
  int n_valid = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j) n_valid += (int64_t(j) * TPR + tid < packs_local) ? 1 : 0;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ y = static_cast<T*>(a.y);
  const PT* __restrict__ w = static_cast<const PT*>(a.weight);
  const PT* __restrict__ b = a.is_rms ? nullptr : static_cast<const PT*>(a.bias);
  const float nf = float(a.N);

  int parity = 0;
  for (int64_t row = cluster_id; row < a.M; row += num_clusters, parity ^= 1) {
    const T* xr = x + row * a.x_row_stride + col0;
    Pack<T> xv[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      xv[j] = j < n_valid ? load_pack(xr + (int64_t(j) * TPR + tid) * V) : zero_pack<T>();
    // This CTA's (count, mean, M2), or (0, 0, sum x^2) for RMS, two-pass from registers.
    MeanM2 local{float(n_local), 0.f, 0.f};
    if (a.is_rms) {
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < VPT; ++j)
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float v = to_float(xv[j].v[k]);
          ss += v * v;
        }
      local.m2 = block_sum<TPR / 32>(make_float2(ss, 0.f), slots).x;
    } else {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < VPT; ++j)
#pragma unroll
        for (int k = 0; k < V; ++k) s += to_float(xv[j].v[k]);
      const float local_n = fmaxf(float(n_local), 1.f);
      const float mean0 = block_sum<TPR / 32>(make_float2(s, 0.f), slots).x / local_n;
      float2 d = make_float2(0.f, 0.f);
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        if (j < n_valid) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const float dv = to_float(xv[j].v[k]) - mean0;
            d.x += dv;
            d.y += dv * dv;
          }
        }
      }
      d = block_sum<TPR / 32>(d, slots);
      const float dm = d.x / local_n;
      local.mean = mean0 + dm;
      local.m2 = fmaxf(d.y - d.x * dm, 0.f);
    }
    if (tid == 0) published[parity] = local;
    cluster.sync();
    float mean = 0.f, rstd;
    if (a.is_rms) {
      // Sum of the ranks' sum x^2 in rank order: reuse the MeanM2 slots' m2 field.
      const int lane = tid & 31;
      float mine = 0.f;
      if (lane < cluster_size) mine = cluster.map_shared_rank(&published[parity], lane)->m2;
      float ss = 0.f;
      for (int k = 0; k < cluster_size; ++k) ss += __shfl_sync(kFullMask, mine, k);
      rstd = 1.f / sqrtf(ss / nf + a.eps);
    } else {
      const MeanM2 total = cluster_merge(cluster, &published[parity], cluster_size);
      mean = total.mean;
      rstd = 1.f / sqrtf(fmaxf(total.m2 / nf, 0.f) + a.eps);
    }
    if (rank == 0 && tid == 0) {
      if (!a.is_rms) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    T* yr = y + row * a.y_row_stride + col0;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (j < n_valid) {
        const int64_t lcol = (int64_t(j) * TPR + tid) * V;
        float wv[V], bv[V];
        if (w != nullptr) load_params<V>(w + col0 + lcol, wv);
        if (b != nullptr) load_params<V>(b + col0 + lcol, bv);
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          float v = (to_float(xv[j].v[k]) - mean) * rstd;
          if (w != nullptr) v *= wv[k];
          if (b != nullptr) v += bv[k];
          out.v[k] = from_float<T>(v);
        }
        store_pack(yr + lcol, out);
      }
    }
  }
  cluster.sync();  // no CTA leaves while another may still read its `published`
#else
  __trap();  // never launched: the host checks the kernel's binary version first
#endif
}

// dW/dB accumulators live in dynamic shared memory: [has_dw + has_db][TPR * E] fp32, entry
// (j * TPR + tid) * V + k owned by thread tid.
template <typename T, typename PT, int TPR, int E>
__global__ void __launch_bounds__(TPR, TPR >= 1024 ? 1 : 2)  // two 512-thread CTAs per SM
    layer_norm_bwd_cluster_kernel(LayerNormBwdArgs a, int64_t slice,
                                  float* __restrict__ dw_partial,
                                  float* __restrict__ db_partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int V = Pack<T>::kWidth;
  constexpr int VPT = E / V;
  extern __shared__ float4 acc_smem4[];
  float* acc_smem = reinterpret_cast<float*>(acc_smem4);
  __shared__ float2 slots[32];
  __shared__ float2 published[2];
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank());
  const int cluster_size = int(cluster.num_blocks());
  const int64_t cluster_id = blockIdx.x / cluster_size;
  const int64_t num_clusters = gridDim.x / cluster_size;
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t(rank) * slice;
  const int64_t n_local = max(int64_t(0), min(slice, a.N - col0));
  const int64_t packs_local = n_local / V;
  int n_valid = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j) n_valid += (int64_t(j) * TPR + tid < packs_local) ? 1 : 0;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  const PT* __restrict__ w = static_cast<const PT*>(a.weight);
  const float nf = float(a.N);
  float* dw_acc = dw_partial != nullptr ? acc_smem : nullptr;
  float* db_acc = db_partial != nullptr ? acc_smem + (dw_partial != nullptr ? TPR * E : 0) : nullptr;
#pragma unroll
  for (int j = 0; j < VPT; ++j)
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int idx = (j * TPR + tid) * V + k;
      if (dw_acc != nullptr) dw_acc[idx] = 0.f;
      if (db_acc != nullptr) db_acc[idx] = 0.f;
    }

  int parity = 0;
  for (int64_t row = cluster_id; row < a.M; row += num_clusters, parity ^= 1) {
    const T* xr = x + row * a.x_row_stride + col0;
    const T* dyr = dy + row * a.dy_row_stride + col0;
    Pack<T> xv[VPT], gv[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t lcol = (int64_t(j) * TPR + tid) * V;
      xv[j] = j < n_valid ? load_pack(xr + lcol) : zero_pack<T>();
      gv[j] = j < n_valid ? load_pack(dyr + lcol) : zero_pack<T>();
    }
    const float mean = a.is_rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (j < n_valid) {
        float wv[V];
        if (w != nullptr) load_params<V>(w + col0 + (int64_t(j) * TPR + tid) * V, wv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float xh = (to_float(xv[j].v[k]) - mean) * rstd;
          const float g = w != nullptr ? to_float(gv[j].v[k]) * wv[k] : to_float(gv[j].v[k]);
          s.x += xh * g;
          s.y += g;
        }
      }
    }
    s = block_sum<TPR / 32>(s, slots);
    if (tid == 0) published[parity] = s;
    cluster.sync();
    const float2 total = cluster_sum(cluster, &published[parity], cluster_size);
    const float c1 = total.x / nf;
    const float c2 = a.is_rms ? 0.f : total.y / nf;
    T* dxr = dx + row * a.dx_row_stride + col0;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (j < n_valid) {
        const int64_t lcol = (int64_t(j) * TPR + tid) * V;
        float wv[V];
        if (w != nullptr) load_params<V>(w + col0 + lcol, wv);
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float xh = (to_float(xv[j].v[k]) - mean) * rstd;
          const float d = to_float(gv[j].v[k]);
          const float g = w != nullptr ? d * wv[k] : d;
          out.v[k] = from_float<T>((g - (xh * c1 + c2)) * rstd);
          const int idx = (j * TPR + tid) * V + k;
          if (dw_acc != nullptr) dw_acc[idx] += d * xh;
          if (db_acc != nullptr) db_acc[idx] += d;
        }
        store_pack(dxr + lcol, out);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    if (j < n_valid) {
      const int64_t lcol = (int64_t(j) * TPR + tid) * V;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int idx = (j * TPR + tid) * V + k;
        if (dw_acc != nullptr) dw_partial[cluster_id * a.N + col0 + lcol + k] = dw_acc[idx];
        if (db_acc != nullptr) db_partial[cluster_id * a.N + col0 + lcol + k] = db_acc[idx];
      }
    }
  }
  cluster.sync();  // keep `published` alive until every rank has read it
#else
  __trap();
#endif
}

// ---- fallback path ---------------------------------------------------------------------------

template <typename T, typename PT, int THREADS>
__global__ void __launch_bounds__(THREADS) layer_norm_fwd_fallback_kernel(LayerNormFwdArgs a) {
  constexpr int NW = THREADS / 32;
  __shared__ MeanM2 stat_slots[NW];
  __shared__ float2 slots[NW];
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ y = static_cast<T*>(a.y);
  const PT* __restrict__ w = static_cast<const PT*>(a.weight);
  const PT* __restrict__ b = a.is_rms ? nullptr : static_cast<const PT*>(a.bias);
  const int64_t n = a.N;
  const float nf = float(n);
  for (int64_t row = blockIdx.x; row < a.M; row += gridDim.x) {
    const T* xr = x + row * a.x_row_stride;
    float mean = 0.f, rstd;
    if (a.is_rms) {
      float ss = 0.f;
      for (int64_t i = threadIdx.x; i < n; i += THREADS) {
        const float v = to_float(xr[i]);
        ss += v * v;
      }
      ss = block_sum<NW>(make_float2(ss, 0.f), slots).x;
      rstd = 1.f / sqrtf(ss / nf + a.eps);
    } else {
      ShiftedSums acc;
      for (int64_t i = threadIdx.x; i < n; i += THREADS) acc.add(to_float(xr[i]));
      const MeanM2 st = block_merge<NW>(acc.finish(), stat_slots);
      mean = st.mean;
      rstd = 1.f / sqrtf(st.m2 / nf + a.eps);
    }
    if (threadIdx.x == 0) {
      if (!a.is_rms) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    T* yr = y + row * a.y_row_stride;
    for (int64_t i = threadIdx.x; i < n; i += THREADS) {
      float v = (to_float(xr[i]) - mean) * rstd;
      if (w != nullptr) v *= to_float(w[i]);
      if (b != nullptr) v += to_float(b[i]);
      yr[i] = from_float<T>(v);
    }
  }
}

template <typename T, typename PT, int THREADS>
__global__ void __launch_bounds__(THREADS) layer_norm_bwd_fallback_kernel(LayerNormBwdArgs a) {
  constexpr int NW = THREADS / 32;
  __shared__ float2 slots[NW];
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  const PT* __restrict__ w = static_cast<const PT*>(a.weight);
  const int64_t n = a.N;
  const float nf = float(n);
  for (int64_t row = blockIdx.x; row < a.M; row += gridDim.x) {
    const T* xr = x + row * a.x_row_stride;
    const T* dyr = dy + row * a.dy_row_stride;
    const float mean = a.is_rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    float2 s = make_float2(0.f, 0.f);
    for (int64_t i = threadIdx.x; i < n; i += THREADS) {
      const float xh = (to_float(xr[i]) - mean) * rstd;
      const float g = w != nullptr ? to_float(dyr[i]) * to_float(w[i]) : to_float(dyr[i]);
      s.x += xh * g;
      s.y += g;
    }
    s = block_sum<NW>(s, slots);
    const float c1 = s.x / nf;
    const float c2 = a.is_rms ? 0.f : s.y / nf;
    T* dxr = dx + row * a.dx_row_stride;
    for (int64_t i = threadIdx.x; i < n; i += THREADS) {
      const float xh = (to_float(xr[i]) - mean) * rstd;
      const float g = w != nullptr ? to_float(dyr[i]) * to_float(w[i]) : to_float(dyr[i]);
      dxr[i] = from_float<T>((g - (xh * c1 + c2)) * rstd);
    }
  }
}

// dW/dB partials of the fallback: grid (column blocks, groups); thread = column, group g sums
// rows [g * rows_per_group, (g + 1) * rows_per_group) in order.
// SQ (the per-example sums of the cluster and fallback paths, an extra pass over x and dy):
// groups are examples (rows_per_group = rows_per_example, g walks them grid-stride); each
// column's sums are squared, each warp adds its 32 columns (no barrier: a block reduction in
// this loop spilled on sm_80), and partial[((g * column blocks + column block) * 8 + warp) * 2 +
// {0, 1}] gets (dW, dB) squared sums for pe_colblock_sq_kernel. `groups` comes from the host.
template <typename T, bool SQ>
__global__ void __launch_bounds__(256)
    layer_norm_bwd_param_partial_kernel(LayerNormBwdArgs a, int64_t rows_per_group,
                                        int64_t groups, float* __restrict__ dw_partial,
                                        float* __restrict__ db_partial) {
  const int64_t col = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (!SQ && col >= a.N) return;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const int64_t row_end = col < a.N ? min(a.M, (g + 1) * rows_per_group) : 0;
    float dw = 0.f, db = 0.f;
    for (int64_t row = g * rows_per_group; row < row_end; ++row) {
      const float mean = a.is_rms ? 0.f : a.mean[row];
      const float d = to_float(dy[row * a.dy_row_stride + col]);
      dw += d * ((to_float(x[row * a.x_row_stride + col]) - mean) * a.rstd[row]);
      db += d;
    }
    if constexpr (SQ) {
      const float2 sq = warp_sum(make_float2(dw * dw, db * db));
      if (threadIdx.x % 32 == 0)
        *reinterpret_cast<float2*>(
            dw_partial + ((g * gridDim.x + blockIdx.x) * 8 + threadIdx.x / 32) * 2) = sq;
    } else {
      if (dw_partial != nullptr) dw_partial[g * a.N + col] = dw;
      if (db_partial != nullptr) db_partial[g * a.N + col] = db;
    }
  }
}

// Per-example squares from the register path's head / tail rows (see layer_norm_bwd_kernel):
// block per example (grid-stride); examples inside one slot were written by that slot.
__global__ void __launch_bounds__(256)
    pe_split_sq_kernel(LayerNormBwdArgs a, int64_t num_slots, const float* __restrict__ seg_w,
                       const float* __restrict__ seg_b) {
  __shared__ float2 slots[8];
  const int64_t rpe = a.rows_per_example, n = a.N;
  const int64_t rps = (a.M + num_slots - 1) / num_slots;  // as on the host (ceil_div)
  for (int64_t ex = blockIdx.x; ex < a.M / rpe; ex += gridDim.x) {
    const int64_t s0 = ex * rpe / rps, s1 = ((ex + 1) * rpe - 1) / rps;
    if (s0 == s1) continue;  // uniform over the block
    // Slot s0's row is its tail unless ex is its first example; every later slot's is a head.
    const int64_t seg0 = 2 * s0 + (ex == s0 * rps / rpe ? 0 : 1);
    float2 sq = make_float2(0.f, 0.f);
    for (int64_t col = threadIdx.x; col < n; col += 256) {
      float w = 0.f, b = 0.f;
      for (int64_t s = s0; s <= s1; ++s) {
        const int64_t seg = s == s0 ? seg0 : 2 * s;
        if (seg_w != nullptr) w += seg_w[seg * n + col];
        if (seg_b != nullptr) b += seg_b[seg * n + col];
      }
      sq.x += w * w;
      sq.y += b * b;
    }
    sq = block_sum<8>(sq, slots);
    if (threadIdx.x == 0) {
      if (a.dweight_sq != nullptr) a.dweight_sq[ex] = sq.x;
      if (a.dbias_sq != nullptr) a.dbias_sq[ex] = sq.y;
    }
  }
}

// Per-example squares from layer_norm_bwd_param_partial_kernel<T, true>'s [examples, column
// blocks * 8 warps, 2]: thread per example, warps in column order.
__global__ void __launch_bounds__(256)
    pe_colblock_sq_kernel(LayerNormBwdArgs a, int64_t col_blocks, const float* __restrict__ part) {
  const int64_t ex = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (ex >= a.M / a.rows_per_example) return;
  float2 sq = make_float2(0.f, 0.f);
  for (int64_t c = 0; c < col_blocks * 8; ++c) {
    sq.x += part[(ex * col_blocks * 8 + c) * 2];
    sq.y += part[(ex * col_blocks * 8 + c) * 2 + 1];
  }
  if (a.dweight_sq != nullptr) a.dweight_sq[ex] = sq.x;
  if (a.dbias_sq != nullptr) a.dbias_sq[ex] = sq.y;
}

// ---- host side -------------------------------------------------------------------------------

template <typename T>
bool fwd_vec_ok(const LayerNormFwdArgs& a) {
  constexpr int V = Pack<T>::kWidth;
  return a.N % V == 0 && vec_ok(a.x, a.x_row_stride, V) && vec_ok(a.y, a.y_row_stride, V) &&
         vec_ok(a.weight, 0, V) && vec_ok(a.is_rms ? nullptr : a.bias, 0, V);
}

template <typename T>
bool bwd_vec_ok(const LayerNormBwdArgs& a) {
  constexpr int V = Pack<T>::kWidth;
  return a.N % V == 0 && vec_ok(a.x, a.x_row_stride, V) && vec_ok(a.dy, a.dy_row_stride, V) &&
         vec_ok(a.dx, a.dx_row_stride, V) && vec_ok(a.weight, 0, V);
}

// True when `kernel` was compiled for sm_90+ (so its cluster body is real) and the device is too.
template <typename K>
bool cluster_capable(K kernel, const DeviceInfo& dev) {
  if (dev.cc_major < 9) return false;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion >= 90;
}

// Cluster geometry for a row of n elements: TPR threads per CTA with E elements each.
struct ClusterShape {
  int threads = 0;  // 0: no cluster path
  int size = 0;
  int64_t slice = 0;
};

template <int V>
ClusterShape cluster_shape(int64_t n, int e) {
  for (int threads : {512, 1024}) {
    const int64_t cap = int64_t(threads) * e;
    const int64_t size = ceil_div(n, cap);
    if (size >= 2 && size <= kMaxClusterSize) {
      ClusterShape s;
      s.threads = threads;
      s.size = int(size);
      s.slice = round_up(ceil_div(n, size), V);
      return s;
    }
  }
  return {};
}

// Sizes (dry_run) or launches a persistent cluster grid of `kernel`: as many clusters as fit on
// the device at once, at most clusters_wanted. cudaErrorNotSupported: no cluster fits.
template <typename... KArgs, typename... Args>
cudaError_t launch_cluster(void (*kernel)(KArgs...), int64_t clusters_wanted,
                           const ClusterShape& shape, size_t smem, cudaStream_t stream,
                           int64_t* clusters_used, bool dry_run, Args... args) {
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(shape.size);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.blockDim = dim3(unsigned(shape.threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // Persistent: as many clusters as fit at once (at least one), each walking rows.
  cfg.gridDim = dim3(unsigned(shape.size));
  int active = 0;
  if (cudaOccupancyMaxActiveClusters(&active, kernel, &cfg) != cudaSuccess || active < 1) {
    cudaGetLastError();
    return cudaErrorNotSupported;
  }
  const int64_t clusters = std::max<int64_t>(1, std::min<int64_t>(clusters_wanted, active));
  *clusters_used = clusters;
  if (dry_run) return cudaSuccess;
  cfg.gridDim = dim3(unsigned(clusters * shape.size));
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename T, typename PT, int TPR, int RPB, int E>
cudaError_t fwd_rows(const LayerNormFwdArgs& a, cudaStream_t stream) {
  const int64_t blocks = std::min(ceil_div(a.M, RPB), kMaxGridX);
  layer_norm_fwd_kernel<T, PT, TPR, RPB, E><<<unsigned(blocks), TPR * RPB, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename PT>
cudaError_t layer_norm_fwd_impl(const LayerNormFwdArgs& a, cudaStream_t stream) {
  const int64_t n = a.N;
  if (fwd_vec_ok<T>(a)) {
    if (n <= 256) return fwd_rows<T, PT, 32, 4, 8>(a, stream);
    if (n <= 512) return fwd_rows<T, PT, 32, 4, 16>(a, stream);
    if (n <= 1024) return fwd_rows<T, PT, 32, 4, 32>(a, stream);
    if (n <= 4096) return fwd_rows<T, PT, 128, 1, 32>(a, stream);
    if (n <= 8192) return fwd_rows<T, PT, 256, 1, 32>(a, stream);
    if (n <= 16384) return fwd_rows<T, PT, 512, 1, 32>(a, stream);
    if (n <= kRegMaxNFwd) return fwd_rows<T, PT, 1024, 1, 32>(a, stream);
    const DeviceInfo dev = current_device_info();
    const ClusterShape shape = cluster_shape<Pack<T>::kWidth>(n, 32);
    if (shape.threads != 0) {
      auto kernel = shape.threads == 512 ? layer_norm_fwd_cluster_kernel<T, PT, 512, 32>
                                         : layer_norm_fwd_cluster_kernel<T, PT, 1024, 32>;
      if (cluster_capable(kernel, dev)) {
        int64_t used = 0;
        const cudaError_t err = launch_cluster(kernel, a.M, shape, 0, stream, &used, false, a,
                                               shape.slice);
        if (err != cudaErrorNotSupported) return err;
      }
    }
  }
  const int64_t blocks = std::min(a.M, kMaxGridX);
  layer_norm_fwd_fallback_kernel<T, PT, kFallbackThreads>
      <<<unsigned(blocks), kFallbackThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// Backward plan: which path, its grid and the [partial_rows, N] fp32 partials it needs.
enum class BwdPath { kRows, kCluster, kFallback };

struct BwdPlan {
  BwdPath path = BwdPath::kFallback;
  int tpr = 0, rpb = 0, e = 0;  // register path configuration
  int64_t blocks = 0;           // register path grid / fallback row-kernel grid
  ClusterShape shape;           // cluster path
  int64_t partial_rows = 0;
  int64_t rows_per_group = 0;   // fallback parameter kernel
};

template <typename T, typename PT>
BwdPlan plan_bwd(const LayerNormBwdArgs& a, const DeviceInfo& dev) {
  BwdPlan p;
  const int64_t n = a.N;
  if (bwd_vec_ok<T>(a) && n <= kRegMaxNBwd) {
    p.path = BwdPath::kRows;
    if (n <= 256) { p.tpr = 32; p.rpb = 4; p.e = 8; }
    else if (n <= 512) { p.tpr = 32; p.rpb = 4; p.e = 16; }
    else if (n <= 2048) { p.tpr = 128; p.rpb = 1; p.e = 16; }
    else if (n <= 4096) { p.tpr = 256; p.rpb = 1; p.e = 16; }
    else { p.tpr = 512; p.rpb = 1; p.e = 16; }
    // Row slots: enough to fill the device (~512 threads per SM resident), at least 8 rows each
    // so the partials stay small next to x and dy.
    const int64_t slots_per_sm = std::max(1, 512 / p.tpr);
    const int64_t slots =
        std::max<int64_t>(1, std::min(dev.sms * slots_per_sm, ceil_div(a.M, 8)));
    p.blocks = ceil_div(slots, p.rpb);
    p.partial_rows = p.blocks * p.rpb;
    return p;
  }
  if (bwd_vec_ok<T>(a)) {
    const ClusterShape shape = cluster_shape<Pack<T>::kWidth>(n, 16);
    if (shape.threads != 0) {
      auto kernel = shape.threads == 512 ? layer_norm_bwd_cluster_kernel<T, PT, 512, 16>
                                         : layer_norm_bwd_cluster_kernel<T, PT, 1024, 16>;
      if (cluster_capable(kernel, dev)) {
        const int arrays = (a.dweight != nullptr) + (a.dbias != nullptr);
        const size_t smem = size_t(arrays) * shape.threads * 16 * sizeof(float);
        int64_t used = 0;
        if (launch_cluster(kernel, a.M, shape, smem, nullptr, &used, true, a, shape.slice,
                           (float*)nullptr, (float*)nullptr) == cudaSuccess) {
          p.path = BwdPath::kCluster;
          p.shape = shape;
          p.partial_rows = used;
          return p;
        }
      }
    }
  }
  p.path = BwdPath::kFallback;
  p.blocks = std::min(a.M, kMaxGridX);
  const int64_t col_blocks = ceil_div(n, 256);
  const int64_t groups = std::max<int64_t>(
      1, std::min<int64_t>({ceil_div(a.M, 8), ceil_div(4 * dev.sms, col_blocks), 65535}));
  p.rows_per_group = ceil_div(a.M, groups);
  p.partial_rows = ceil_div(a.M, p.rows_per_group);
  return p;
}

template <typename T, typename PT, int TPR, int RPB, int E>
cudaError_t bwd_rows(const LayerNormBwdArgs& a, int64_t blocks, float* dw, float* db,
                     float* seg_w, float* seg_b, cudaStream_t stream) {
  if (a.rows_per_example > 0) {
    auto kernel = layer_norm_bwd_kernel<T, PT, TPR, RPB, E, true>;
    const size_t smem = size_t(2) * E * TPR * RPB * sizeof(float);  // up to 64 KiB (N = 8192)
    if (smem > 48 * 1024) {
      const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<unsigned(blocks), TPR * RPB, smem, stream>>>(a, dw, db, seg_w, seg_b);
  } else {
    layer_norm_bwd_kernel<T, PT, TPR, RPB, E, false>
        <<<unsigned(blocks), TPR * RPB, 0, stream>>>(a, dw, db, nullptr, nullptr);
  }
  return cudaGetLastError();
}

// Per-example scratch (a.rows_per_example > 0): the register path's head / tail rows
// [2 * slots, N] per wanted square, the other paths' [examples, column blocks * 8 warps, 2].
struct PeScratch {
  float* seg_w = nullptr;
  float* seg_b = nullptr;
  float* colblock = nullptr;
};

PeScratch take_pe_scratch(Workspace& ws, const LayerNormBwdArgs& a, const BwdPlan& p) {
  PeScratch s;
  if (a.rows_per_example <= 0 || a.M == 0) return s;
  if (p.path == BwdPath::kRows) {
    if (a.dweight_sq != nullptr) s.seg_w = ws.take<float>(2 * p.partial_rows * a.N);
    if (a.dbias_sq != nullptr) s.seg_b = ws.take<float>(2 * p.partial_rows * a.N);
  } else if (a.dweight_sq != nullptr || a.dbias_sq != nullptr) {
    s.colblock = ws.take<float>(a.M / a.rows_per_example * ceil_div(a.N, 256) * 8 * 2);
  }
  return s;
}

template <typename T, typename PT>
size_t bwd_workspace(const LayerNormBwdArgs& a, const DeviceInfo& dev, const BwdPlan& p) {
  Workspace ws(nullptr);
  if (a.dweight != nullptr) ws.take<float>(p.partial_rows * a.N);
  if (a.dbias != nullptr) ws.take<float>(p.partial_rows * a.N);
  take_pe_scratch(ws, a, p);
  return ws.bytes();
}

// The per-example squares after the plain kernels of `p` ran (M > 0, N > 0).
template <typename T>
cudaError_t pe_finish(const LayerNormBwdArgs& a, const BwdPlan& p, const PeScratch& s,
                      cudaStream_t stream) {
  if (a.dweight_sq == nullptr && a.dbias_sq == nullptr) return cudaSuccess;
  const int64_t examples = a.M / a.rows_per_example;
  if (p.path == BwdPath::kRows) {  // the row kernel wrote the in-slot examples already
    pe_split_sq_kernel<<<unsigned(std::min(examples, kMaxGridX)), 256, 0, stream>>>(
        a, p.partial_rows, s.seg_w, s.seg_b);
    return cudaGetLastError();
  }
  // Cluster / fallback: one more pass over x and dy, summing each example's rows per column.
  const int64_t col_blocks = ceil_div(a.N, 256);
  const dim3 grid(unsigned(col_blocks), unsigned(std::min<int64_t>(examples, 65535)));
  layer_norm_bwd_param_partial_kernel<T, true><<<grid, 256, 0, stream>>>(
      a, a.rows_per_example, examples, s.colblock, nullptr);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  pe_colblock_sq_kernel<<<unsigned(ceil_div(examples, 256)), 256, 0, stream>>>(a, col_blocks,
                                                                               s.colblock);
  return cudaGetLastError();
}

template <typename T, typename PT>
cudaError_t layer_norm_bwd_impl(const LayerNormBwdArgs& a, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  const BwdPlan p = plan_bwd<T, PT>(a, dev);
  if (a.workspace_bytes < bwd_workspace<T, PT>(a, dev, p)) return cudaErrorInvalidValue;
  Workspace ws(a.workspace);
  float* dw = a.dweight != nullptr ? ws.take<float>(p.partial_rows * a.N) : nullptr;
  float* db = a.dbias != nullptr ? ws.take<float>(p.partial_rows * a.N) : nullptr;
  const PeScratch pe = take_pe_scratch(ws, a, p);
  float* sw = pe.seg_w;
  float* sb = pe.seg_b;
  cudaError_t err = cudaSuccess;
  if (p.path == BwdPath::kRows) {
    if (p.tpr == 32 && p.e == 8) err = bwd_rows<T, PT, 32, 4, 8>(a, p.blocks, dw, db, sw, sb, stream);
    else if (p.tpr == 32) err = bwd_rows<T, PT, 32, 4, 16>(a, p.blocks, dw, db, sw, sb, stream);
    else if (p.tpr == 128) err = bwd_rows<T, PT, 128, 1, 16>(a, p.blocks, dw, db, sw, sb, stream);
    else if (p.tpr == 256) err = bwd_rows<T, PT, 256, 1, 16>(a, p.blocks, dw, db, sw, sb, stream);
    else err = bwd_rows<T, PT, 512, 1, 16>(a, p.blocks, dw, db, sw, sb, stream);
  } else if (p.path == BwdPath::kCluster) {
    auto kernel = p.shape.threads == 512 ? layer_norm_bwd_cluster_kernel<T, PT, 512, 16>
                                         : layer_norm_bwd_cluster_kernel<T, PT, 1024, 16>;
    const int arrays = (dw != nullptr) + (db != nullptr);
    const size_t smem = size_t(arrays) * p.shape.threads * 16 * sizeof(float);
    int64_t used = 0;
    err = launch_cluster(kernel, p.partial_rows, p.shape, smem, stream, &used, false, a,
                         p.shape.slice, dw, db);
    if (err == cudaSuccess && used != p.partial_rows) err = cudaErrorLaunchFailure;
  } else {
    if (a.M > 0) {
      layer_norm_bwd_fallback_kernel<T, PT, kFallbackThreads>
          <<<unsigned(p.blocks), kFallbackThreads, 0, stream>>>(a);
      err = cudaGetLastError();
      if (err == cudaSuccess && (dw != nullptr || db != nullptr)) {
        const dim3 grid(unsigned(ceil_div(a.N, 256)), unsigned(p.partial_rows));
        layer_norm_bwd_param_partial_kernel<T, false><<<grid, 256, 0, stream>>>(
            a, p.rows_per_group, p.partial_rows, dw, db);
        err = cudaGetLastError();
      }
    }
  }
  if (err == cudaSuccess && a.rows_per_example > 0) err = pe_finish<T>(a, p, pe, stream);
  if (err != cudaSuccess) return err;
  const int64_t rows = a.M > 0 ? p.partial_rows : 0;
  err = launch_column_sum(dw, rows, a.N, static_cast<PT*>(a.dweight), stream);
  if (err != cudaSuccess) return err;
  return launch_column_sum(db, rows, a.N, static_cast<PT*>(a.dbias), stream);
}

// With no parameter pointer the parameter dtype is irrelevant: use x's.
template <typename Args>
Args normalized(const Args& a, bool has_params) {
  Args b = a;
  if (!has_params) b.param_dtype = b.dtype;
  return b;
}

}  // namespace

cudaError_t launch_layer_norm_fwd(const LayerNormFwdArgs& args, cudaStream_t stream) {
  if (args.M < 0 || args.N < 0 || args.rstd == nullptr || (!args.is_rms && args.mean == nullptr))
    return cudaErrorInvalidValue;
  if (args.M == 0) return cudaSuccess;
  if (args.N == 0) {  // like torch: no features means NaN statistics
    cudaError_t err = launch_fill(args.rstd, args.M, __builtin_nanf(""), stream);
    if (err != cudaSuccess || args.is_rms) return err;
    return launch_fill(args.mean, args.M, __builtin_nanf(""), stream);
  }
  const LayerNormFwdArgs a = normalized(
      args, args.weight != nullptr || (!args.is_rms && args.bias != nullptr));
  return dispatch_types(a.dtype, a.param_dtype, [&](auto t, auto p) -> cudaError_t {
    return layer_norm_fwd_impl<typename decltype(t)::type, typename decltype(p)::type>(a, stream);
  });
}

size_t layer_norm_bwd_workspace_bytes(const LayerNormBwdArgs& args) {
  const LayerNormBwdArgs a = normalized(
      args, args.weight != nullptr || args.dweight != nullptr || args.dbias != nullptr);
  if (a.M <= 0 || a.N <= 0) return 0;
  size_t bytes = 0;
  dispatch_types(a.dtype, a.param_dtype, [&](auto t, auto p) -> cudaError_t {
    using T = typename decltype(t)::type;
    using PT = typename decltype(p)::type;
    const DeviceInfo dev = current_device_info();
    bytes = bwd_workspace<T, PT>(a, dev, plan_bwd<T, PT>(a, dev));
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t launch_layer_norm_bwd(const LayerNormBwdArgs& args, cudaStream_t stream) {
  if (args.M < 0 || args.N < 0 || args.rstd == nullptr || (!args.is_rms && args.mean == nullptr))
    return cudaErrorInvalidValue;
  if (args.rows_per_example < 0 ||
      (args.rows_per_example > 0 && args.M % args.rows_per_example != 0))
    return cudaErrorInvalidValue;
  const LayerNormBwdArgs a = normalized(
      args, args.weight != nullptr || args.dweight != nullptr || args.dbias != nullptr);
  if (a.N == 0) {  // no features: every example's gradient is empty, its norm 0
    if (a.rows_per_example == 0 || a.M == 0) return cudaSuccess;
    cudaError_t err = launch_fill(a.dweight_sq, a.M / a.rows_per_example, 0.f, stream);
    if (err != cudaSuccess) return err;
    return launch_fill(a.dbias_sq, a.M / a.rows_per_example, 0.f, stream);
  }
  return dispatch_types(a.dtype, a.param_dtype, [&](auto t, auto p) -> cudaError_t {
    using T = typename decltype(t)::type;
    using PT = typename decltype(p)::type;
    if (a.M == 0) {  // empty batch: zero parameter gradients, nothing else to do
      cudaError_t err = launch_column_sum<PT>(nullptr, 0, a.N, static_cast<PT*>(a.dweight), stream);
      if (err != cudaSuccess) return err;
      return launch_column_sum<PT>(nullptr, 0, a.N, static_cast<PT*>(a.dbias), stream);
    }
    return layer_norm_bwd_impl<T, PT>(a, stream);
  });
}

}  // namespace fastnorm
