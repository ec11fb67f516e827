// Warp, block and (sm_90) cluster reductions, all in a fixed order.
//
// Sums use xor-butterfly shuffles: float addition is commutative bit for bit, so every lane ends
// with the identical value and no broadcast is needed. Chan merges (welford.cuh) are not, so they
// use a shuffle-down tree into lane 0 followed by a broadcast.
//
// Block reductions: warp reduce -> one slot per warp in shared memory -> every warp re-reduces
// the slots (so all threads get the result without a third barrier). The leading __syncthreads
// protects the slots from a warp that is still reading the previous reduction's values.
#pragma once

#include <cuda_runtime.h>

#include "welford.cuh"

namespace fastnorm {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v.x += __shfl_xor_sync(kFullMask, v.x, off);
    v.y += __shfl_xor_sync(kFullMask, v.y, off);
  }
  return v;
}

// Sum over the NUM_WARPS warps of a block; `slots` holds at least NUM_WARPS float2.
// Every thread of the block must call it (it contains __syncthreads).
template <int NUM_WARPS>
__device__ __forceinline__ float2 block_sum(float2 v, float2* slots) {
  static_assert(NUM_WARPS >= 1 && NUM_WARPS <= 32, "block of 32..1024 threads");
  v = warp_sum(v);
  if constexpr (NUM_WARPS == 1) {
    return v;
  } else {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    float2 w = lane < NUM_WARPS ? slots[lane] : make_float2(0.f, 0.f);
    return warp_sum(w);
  }
}

__device__ __forceinline__ MeanM2 shfl_stats(const MeanM2& s, int src_lane) {
  MeanM2 r;
  r.n = __shfl_sync(kFullMask, s.n, src_lane);
  r.mean = __shfl_sync(kFullMask, s.mean, src_lane);
  r.m2 = __shfl_sync(kFullMask, s.m2, src_lane);
  return r;
}

// Chan merge over a warp: shuffle-down tree into lane 0, then broadcast to all lanes.
__device__ __forceinline__ MeanM2 warp_merge(MeanM2 s) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MeanM2 o;
    o.n = __shfl_down_sync(kFullMask, s.n, off);
    o.mean = __shfl_down_sync(kFullMask, s.mean, off);
    o.m2 = __shfl_down_sync(kFullMask, s.m2, off);
    if (lane + off < 32) s = chan_merge(s, o);
  }
  return shfl_stats(s, 0);
}

// Chan merge over the block (threadIdx.x only); `slots` holds at least NUM_WARPS MeanM2.
// Warps are merged in index order by every warp (identical results everywhere).
template <int NUM_WARPS>
__device__ __forceinline__ MeanM2 block_merge(MeanM2 s, MeanM2* slots) {
  s = warp_merge(s);
  if constexpr (NUM_WARPS == 1) {
    return s;
  } else {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) slots[warp] = s;
    __syncthreads();
    MeanM2 w = lane < NUM_WARPS ? slots[lane] : MeanM2{0.f, 0.f, 0.f};
    return warp_merge(w);
  }
}

}  // namespace fastnorm

// --- Thread-block clusters (sm_90+): distributed shared memory reductions ---------------------
//
// Each CTA of a cluster publishes its partial in its own shared memory, the cluster barrier
// (barrier.cluster.arrive.release / wait.acquire) makes the writes visible, and every warp reads
// all ranks' partials through DSMEM (mapa + ld.shared::cluster) and combines them in rank order:
// all CTAs of the cluster get bit-identical statistics. Callers double-buffer the published slot
// by row parity, so one cluster barrier per row suffices (a CTA can only overwrite a slot after
// every CTA has passed the next row's barrier, i.e. finished reading it), and end the kernel with
// one more barrier so no CTA exits while another still reads its shared memory.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>

namespace fastnorm {

// Lane k < num_ranks of the calling warp loads rank k's slot; the warp then combines the slots
// in rank order. Returns the same value in every lane of every warp of every CTA.
__device__ __forceinline__ float2 cluster_sum(const cooperative_groups::cluster_group& cluster,
                                              float2* slot, int num_ranks) {
  const int lane = threadIdx.x & 31;
  float2 mine = make_float2(0.f, 0.f);
  if (lane < num_ranks) mine = *cluster.map_shared_rank(slot, lane);
  float2 total = make_float2(0.f, 0.f);
  for (int k = 0; k < num_ranks; ++k) {
    total.x += __shfl_sync(kFullMask, mine.x, k);
    total.y += __shfl_sync(kFullMask, mine.y, k);
  }
  return total;
}

__device__ __forceinline__ MeanM2 cluster_merge(const cooperative_groups::cluster_group& cluster,
                                                MeanM2* slot, int num_ranks) {
  const int lane = threadIdx.x & 31;
  MeanM2 mine{0.f, 0.f, 0.f};
  if (lane < num_ranks) mine = *cluster.map_shared_rank(slot, lane);
  MeanM2 total = shfl_stats(mine, 0);
  for (int k = 1; k < num_ranks; ++k) total = chan_merge(total, shfl_stats(mine, k));
  return total;
}

}  // namespace fastnorm
#endif
