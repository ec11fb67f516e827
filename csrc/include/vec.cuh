// 16-byte vector access and the element <-> fp32 conversions.
//
// A Pack<T> is the 16 bytes one ld.global.v4 / st.global.v4 moves: 4 fp32 or 8 fp16/bf16. Kernels
// keep rows in registers as arrays of Packs (raw element type, converted to fp32 on use, which
// halves the registers for 16-bit types). The vector path needs every pointer 16-byte aligned,
// every row stride and the row length a multiple of the pack width; `vec_ok` checks that on the
// host and the launchers take a scalar (one element per load, still coalesced) path otherwise.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastnorm {

template <typename T>
struct alignas(16) Pack {
  static constexpr int kWidth = 16 / sizeof(T);
  T v[kWidth];
};

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// True when `p` (null counts as aligned: an absent operand) is 16-byte aligned and `stride`
// (elements) is a multiple of `width`.
__host__ __device__ inline bool vec_ok(const void* p, int64_t stride, int width) {
  return (p == nullptr || aligned16(p)) && stride % width == 0;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One aligned 16-byte load / store. `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
  *reinterpret_cast<Pack<T>*>(p) = v;
}

// W consecutive parameters (weight or bias) as fp32, read in 16-byte pieces: W * sizeof(PT) is a
// multiple of 16 (W is the pack width of the activation type, PT is that type or float), and p is
// 16-byte aligned whenever the caller takes the vector path.
template <int W, typename PT>
__device__ __forceinline__ void load_params(const PT* p, float (&out)[W]) {
  static_assert((W * sizeof(PT)) % 16 == 0, "parameter vector must be whole 16-byte pieces");
  constexpr int kPer = 16 / sizeof(PT);
#pragma unroll
  for (int piece = 0; piece < W / kPer; ++piece) {
    const Pack<PT> pk = load_pack(p + piece * kPer);
#pragma unroll
    for (int k = 0; k < kPer; ++k) out[piece * kPer + k] = to_float(pk.v[k]);
  }
}

}  // namespace fastnorm
