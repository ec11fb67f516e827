// Kernels shared by GroupNorm (group_norm.cu) and BatchNorm (batch_norm.cu): both reduce
// per-channel statistics over an (N, C, S) tensor and then apply a per-channel (BatchNorm) or
// per-(sample, channel) (GroupNorm) affine map. Two layouts:
//   channels-first (CF, NCHW): R = N*C contiguous rows of S elements, row r = n*C + c;
//   channels-last (CL):        per sample an (S, C) row-major matrix (BatchNorm views the whole
//                              batch as one (N*S, C) matrix).
//
// Tables. The elementwise and backward-reduce kernels read per-index parameters from fp32
// tables built by small per-family kernels, indexed by c (BatchNorm) or n*C + c (GroupNorm):
//   TabA = {mean, rstd, w, b}  (w = 1, b = 0 when absent),
//   TabB = {c1, c2}            (backward only).
// The pre-activation is always z = ((x - mean) * rstd) * w + b, forward and backward, so the
// ReLU mask of the backward matches the forward's bit for bit; (x - mean) * rstd rather than
// x * scale - shift keeps large means exact.
//
// Reductions write partials laid out [split][B * C] (B = N for per-sample partials, 1 for a
// CL BatchNorm) that the families combine in a fixed order:
//   forward:  (count, mean, M2) per partial, from per-thread shifted sums merged with Chan's
//             formula (welford.cuh);
//   backward: P1 = sum dz * x_hat, P2 = sum dz, dz = dy * act'(z).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"
#include "launch.h"
#include "reduce.cuh"
#include "vec.cuh"
#include "welford.cuh"

namespace fastnorm {

constexpr int kRowsThreads = 128;   // rows kernel block
constexpr int kColsChannels = 32;   // cols kernel: channels per block (one warp's lanes)
constexpr int kColsRows = 8;        // cols kernel: rows of threads per block
constexpr int kElemThreads = 256;   // elementwise kernel block

template <Activation ACT>
__device__ __forceinline__ float activate(float z) {
  if constexpr (ACT == Activation::kSilu) {
    return z / (1.f + __expf(-z));
  } else if constexpr (ACT == Activation::kRelu) {
    return (z > 0.f || z != z) ? z : 0.f;  // NaN propagates, as torch.relu
  } else {
    return z;
  }
}

// dy * act'(z) for z = x_hat * w + b.
template <Activation ACT>
__device__ __forceinline__ float activation_grad(float dy, float x_hat, float w, float b) {
  if constexpr (ACT == Activation::kSilu) {
    const float z = x_hat * w + b;
    const float s = 1.f / (1.f + __expf(-z));
    return dy * (s + z * s * (1.f - s));
  } else if constexpr (ACT == Activation::kRelu) {
    const float z = x_hat * w + b;
    return z > 0.f ? dy : 0.f;  // as torch's threshold_backward: NaN z gives 0
  } else {
    return dy;
  }
}

// ---- reduce over contiguous rows (CF) --------------------------------------------------------
// Grid (R, splits). Block (row r, split sp) reduces elements [sp * split_len,
// min(S, (sp + 1) * split_len)) of row r and writes partial index sp * R + r.
// tab_index(r) = PER_SAMPLE ? r : r % C. VEC: S and split_len multiples of the pack width and
// x / dy 16-byte aligned.
template <typename T, bool BWD, Activation ACT, bool PER_SAMPLE, bool VEC>
__global__ void __launch_bounds__(kRowsThreads)
    reduce_rows_kernel(const T* __restrict__ x, const T* __restrict__ dy, int64_t R, int64_t C,
                       int64_t S, int64_t split_len, const float4* __restrict__ tab_a,
                       float4* __restrict__ stats_partial, float* __restrict__ p1_partial,
                       float* __restrict__ p2_partial) {
  constexpr int NW = kRowsThreads / 32;
  constexpr int V = VEC ? Pack<T>::kWidth : 1;
  __shared__ MeanM2 stat_slots[NW];
  __shared__ float2 slots[NW];
  const int64_t r = blockIdx.x;
  const int64_t sp = blockIdx.y;
  const int64_t begin = sp * split_len;
  const int64_t end = min(S, begin + split_len);
  const T* xr = x + r * S;
  const int64_t out = sp * R + r;
  if constexpr (!BWD) {
    ShiftedSums acc;
    for (int64_t i = begin + int64_t(threadIdx.x) * V; i < end; i += int64_t(kRowsThreads) * V) {
      if constexpr (VEC) {
        const Pack<T> p = load_pack(xr + i);
#pragma unroll
        for (int k = 0; k < V; ++k) acc.add(to_float(p.v[k]));
      } else {
        acc.add(to_float(xr[i]));
      }
    }
    const MeanM2 st = block_merge<NW>(acc.finish(), stat_slots);
    if (threadIdx.x == 0) stats_partial[out] = make_float4(st.n, st.mean, st.m2, 0.f);
  } else {
    const float4 A = tab_a[PER_SAMPLE ? r : r % C];
    const T* dyr = dy + r * S;
    float2 s = make_float2(0.f, 0.f);
    for (int64_t i = begin + int64_t(threadIdx.x) * V; i < end; i += int64_t(kRowsThreads) * V) {
      if constexpr (VEC) {
        const Pack<T> px = load_pack(xr + i);
        const Pack<T> pg = load_pack(dyr + i);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float xh = (to_float(px.v[k]) - A.x) * A.y;
          const float dz = activation_grad<ACT>(to_float(pg.v[k]), xh, A.z, A.w);
          s.x += dz * xh;
          s.y += dz;
        }
      } else {
        const float xh = (to_float(xr[i]) - A.x) * A.y;
        const float dz = activation_grad<ACT>(to_float(dyr[i]), xh, A.z, A.w);
        s.x += dz * xh;
        s.y += dz;
      }
    }
    s = block_sum<NW>(s, slots);
    if (threadIdx.x == 0) {
      p1_partial[out] = s.x;
      p2_partial[out] = s.y;
    }
  }
}

// ---- reduce over the rows of (rows_per_batch, C) matrices (CL) -------------------------------
// Grid (B * splits, ceil(C / 32)); block (32 channels, 8 rows). Block (b, sp, channel block)
// reduces rows [sp * split_len, min(rows_per_batch, (sp + 1) * split_len)) of batch b; thread
// (tx, ty) walks rows ty, ty + 8, ...; the 8 row-threads of a channel are merged in ty order.
// Partial index sp * (B * C) + b * C + c; tab_index = PER_SAMPLE ? b * C + c : c.
template <typename T, bool BWD, Activation ACT, bool PER_SAMPLE>
__global__ void __launch_bounds__(kColsChannels * kColsRows)
    reduce_cols_kernel(const T* __restrict__ x, const T* __restrict__ dy, int64_t B, int64_t C,
                       int64_t rows_per_batch, int64_t split_len, int64_t splits,
                       const float4* __restrict__ tab_a, float4* __restrict__ stats_partial,
                       float* __restrict__ p1_partial, float* __restrict__ p2_partial) {
  __shared__ MeanM2 stat_tile[kColsRows][kColsChannels];
  __shared__ float2 sum_tile[kColsRows][kColsChannels];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.x / splits;
  const int64_t sp = blockIdx.x % splits;
  const int64_t c = int64_t(blockIdx.y) * kColsChannels + tx;
  const bool active = c < C;
  const int64_t begin = sp * split_len;
  const int64_t end = min(rows_per_batch, begin + split_len);
  const int64_t base = b * rows_per_batch * C;
  const int64_t out = sp * (B * C) + b * C + c;
  if constexpr (!BWD) {
    ShiftedSums acc;
    if (active)
      for (int64_t row = begin + ty; row < end; row += kColsRows)
        acc.add(to_float(x[base + row * C + c]));
    stat_tile[ty][tx] = acc.finish();
    __syncthreads();
    if (ty == 0 && active) {
      MeanM2 st = stat_tile[0][tx];
#pragma unroll
      for (int k = 1; k < kColsRows; ++k) st = chan_merge(st, stat_tile[k][tx]);
      stats_partial[out] = make_float4(st.n, st.mean, st.m2, 0.f);
    }
  } else {
    float2 s = make_float2(0.f, 0.f);
    if (active) {
      const float4 A = tab_a[PER_SAMPLE ? b * C + c : c];
      for (int64_t row = begin + ty; row < end; row += kColsRows) {
        const int64_t i = base + row * C + c;
        const float xh = (to_float(x[i]) - A.x) * A.y;
        const float dz = activation_grad<ACT>(to_float(dy[i]), xh, A.z, A.w);
        s.x += dz * xh;
        s.y += dz;
      }
    }
    sum_tile[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && active) {
      float2 t = sum_tile[0][tx];
#pragma unroll
      for (int k = 1; k < kColsRows; ++k) {
        t.x += sum_tile[k][tx].x;
        t.y += sum_tile[k][tx].y;
      }
      p1_partial[out] = t.x;
      p2_partial[out] = t.y;
    }
  }
}

// ---- elementwise -----------------------------------------------------------------------------
// Forward: out = act(((x - mean) * rstd) * w + b). Backward: dz = dy * act'(z),
// out = (w * dz - (x_hat * c1 + c2)) * rstd. Grid-stride over packs of V elements of the whole
// (N, C, S) tensor. VEC: the pack never straddles a table index (S % V == 0 for CF, C % V == 0
// for CL) and all pointers are 16-byte aligned.
template <typename T, bool BWD, Activation ACT, bool CL, bool PER_SAMPLE, bool VEC>
__global__ void __launch_bounds__(kElemThreads)
    elementwise_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                       int64_t total, int64_t C, int64_t S, const float4* __restrict__ tab_a,
                       const float2* __restrict__ tab_b) {
  constexpr int V = VEC ? Pack<T>::kWidth : 1;
  const int64_t num_packs = total / V;  // total % V == 0 whenever VEC
  const int64_t CS = C * S;
  for (int64_t p = int64_t(blockIdx.x) * kElemThreads + threadIdx.x; p < num_packs;
       p += int64_t(gridDim.x) * kElemThreads) {
    const int64_t e = p * V;
    float xs[V], gs[V];
    if constexpr (VEC) {
      const Pack<T> px = load_pack(x + e);
#pragma unroll
      for (int k = 0; k < V; ++k) xs[k] = to_float(px.v[k]);
      if constexpr (BWD) {
        const Pack<T> pg = load_pack(dy + e);
#pragma unroll
        for (int k = 0; k < V; ++k) gs[k] = to_float(pg.v[k]);
      }
    } else {
      xs[0] = to_float(x[e]);
      if constexpr (BWD) gs[0] = to_float(dy[e]);
    }
    // Table index of the pack's first element; CL packs cover consecutive channels.
    int64_t idx0;
    if constexpr (CL) {
      const int64_t c = e % C;
      idx0 = PER_SAMPLE ? (e / CS) * C + c : c;
    } else {
      const int64_t row = e / S;
      idx0 = PER_SAMPLE ? row : row % C;
    }
    float res[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t idx = CL ? idx0 + k : idx0;
      const float4 A = tab_a[idx];
      const float xh = (xs[k] - A.x) * A.y;
      if constexpr (!BWD) {
        res[k] = activate<ACT>(xh * A.z + A.w);
      } else {
        const float2 Bc = tab_b[idx];
        const float dz = activation_grad<ACT>(gs[k], xh, A.z, A.w);
        res[k] = (A.z * dz - (xh * Bc.x + Bc.y)) * A.y;
      }
    }
    if constexpr (VEC) {
      Pack<T> po;
#pragma unroll
      for (int k = 0; k < V; ++k) po.v[k] = from_float<T>(res[k]);
      store_pack(out + e, po);
    } else {
      out[e] = from_float<T>(res[0]);
    }
  }
}

// ---- host helpers ----------------------------------------------------------------------------

struct RowsPlan {
  int64_t split_len = 0, splits = 1;
  bool vec = false;
};

template <typename T>
RowsPlan plan_rows(int64_t R, int64_t S, int sms, bool aligned) {
  constexpr int V = Pack<T>::kWidth;
  RowsPlan p;
  p.vec = aligned && S % V == 0;
  // ~4 blocks per SM in total, never splits shorter than 4096 elements.
  const int64_t want = std::max<int64_t>(1, ceil_div(4 * int64_t(sms), std::max<int64_t>(R, 1)));
  int64_t splits = std::max<int64_t>(1, std::min({want, ceil_div(S, 4096), int64_t(65535)}));
  p.split_len = round_up(ceil_div(S, splits), V);
  p.splits = std::max<int64_t>(1, ceil_div(S, p.split_len));
  return p;
}

struct ColsPlan {
  int64_t split_len = 0, splits = 1, channel_blocks = 1;
};

inline ColsPlan plan_cols(int64_t B, int64_t C, int64_t rows, int sms) {
  ColsPlan p;
  p.channel_blocks = ceil_div(C, kColsChannels);
  const int64_t want = ceil_div(4 * int64_t(sms), std::max<int64_t>(1, p.channel_blocks * B));
  int64_t splits = std::max<int64_t>(
      1, std::min({want, ceil_div(rows, 8 * kColsRows), (int64_t(1) << 30) / std::max<int64_t>(B, 1)}));
  p.split_len = ceil_div(rows, splits);
  p.splits = std::max<int64_t>(1, ceil_div(rows, p.split_len));
  return p;
}

// The partial rows one reduction produces: [splits][B * C].
template <typename T>
int64_t reduce_partial_rows(bool channels_last, int64_t N, int64_t C, int64_t S, bool per_sample_cl,
                            int sms) {
  if (channels_last) {
    const int64_t B = per_sample_cl ? N : 1;
    return plan_cols(B, C, per_sample_cl ? S : N * S, sms).splits;
  }
  return plan_rows<T>(N * C, S, sms, true).splits;
}

// Launch the reduction of an (N, C, S) tensor. per_sample_cl: CL partials per sample (B = N;
// GroupNorm) or over the whole batch (B = 1; BatchNorm). CF partials are always per (n, c).
// Returns through *B_out the B of the partial layout [splits][B * C] and *splits_out.
template <typename T, bool BWD, Activation ACT, bool PER_SAMPLE>
cudaError_t launch_reduce(const T* x, const T* dy, int64_t N, int64_t C, int64_t S,
                          bool channels_last, bool per_sample_cl, int sms, bool aligned,
                          const float4* tab_a, float4* stats_partial, float* p1, float* p2,
                          int64_t* B_out, int64_t* splits_out, cudaStream_t stream) {
  if (channels_last) {
    const int64_t B = per_sample_cl ? N : 1;
    const int64_t rows = per_sample_cl ? S : N * S;
    const ColsPlan p = plan_cols(B, C, rows, sms);
    *B_out = B;
    *splits_out = p.splits;
    const dim3 grid(unsigned(B * p.splits), unsigned(p.channel_blocks));
    const dim3 block(kColsChannels, kColsRows);
    reduce_cols_kernel<T, BWD, ACT, PER_SAMPLE><<<grid, block, 0, stream>>>(
        x, dy, B, C, rows, p.split_len, p.splits, tab_a, stats_partial, p1, p2);
    return cudaGetLastError();
  }
  const RowsPlan p = plan_rows<T>(N * C, S, sms, aligned);
  *B_out = N;
  *splits_out = p.splits;
  const dim3 grid(unsigned(N * C), unsigned(p.splits));
  if (p.vec) {
    reduce_rows_kernel<T, BWD, ACT, PER_SAMPLE, true><<<grid, kRowsThreads, 0, stream>>>(
        x, dy, N * C, C, S, p.split_len, tab_a, stats_partial, p1, p2);
  } else {
    reduce_rows_kernel<T, BWD, ACT, PER_SAMPLE, false><<<grid, kRowsThreads, 0, stream>>>(
        x, dy, N * C, C, S, p.split_len, tab_a, stats_partial, p1, p2);
  }
  return cudaGetLastError();
}

template <typename T, bool BWD, Activation ACT, bool PER_SAMPLE>
cudaError_t launch_elementwise(const T* x, const T* dy, T* out, int64_t N, int64_t C, int64_t S,
                               bool channels_last, int sms, const float4* tab_a,
                               const float2* tab_b, cudaStream_t stream) {
  constexpr int V = Pack<T>::kWidth;
  const int64_t total = N * C * S;
  if (total == 0) return cudaSuccess;
  const bool vec = (channels_last ? C % V == 0 : S % V == 0) && aligned16(x) && aligned16(out) &&
                   (!BWD || aligned16(dy));
  const int64_t packs = vec ? total / V : total;
  const int64_t blocks = std::max<int64_t>(
      1, std::min(ceil_div(packs, kElemThreads), int64_t(sms) * 16));
  const unsigned g = unsigned(blocks);
#define FASTNORM_ELEMWISE(CL_, VEC_)                                                     \
  elementwise_kernel<T, BWD, ACT, CL_, PER_SAMPLE, VEC_><<<g, kElemThreads, 0, stream>>>( \
      x, dy, out, total, C, S, tab_a, tab_b)
  if (channels_last) {
    if (vec) FASTNORM_ELEMWISE(true, true); else FASTNORM_ELEMWISE(true, false);
  } else {
    if (vec) FASTNORM_ELEMWISE(false, true); else FASTNORM_ELEMWISE(false, false);
  }
#undef FASTNORM_ELEMWISE
  return cudaGetLastError();
}

}  // namespace fastnorm
