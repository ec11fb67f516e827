// Small pieces every .cu shares: device queries, integer helpers, workspace carving, the fixed-
// order column sum (second stage of every deterministic parameter-gradient reduction) and a fill.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "vec.cuh"

namespace fastnorm {

constexpr int64_t kMaxGridX = int64_t(1) << 30;  // rows beyond it are taken by a grid-stride loop

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

struct DeviceInfo {
  int sms = 1;
  int cc_major = 0;
};

// Properties of the current device (the one ops.cpp's device guard selected).
inline DeviceInfo current_device_info() {
  DeviceInfo info;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return info;
  cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  if (info.sms < 1) info.sms = 1;
  return info;
}

// Hands out 256-byte aligned pieces of a caller-provided workspace. With base == nullptr it only
// counts, which is how the *_workspace_bytes functions reuse the launch plans.
class Workspace {
 public:
  explicit Workspace(void* base) : base_(static_cast<char*>(base)) {}
  template <typename U>
  U* take(int64_t count) {
    const int64_t offset = used_;
    used_ += round_up(count * int64_t(sizeof(U)), 256);
    return base_ == nullptr ? nullptr : reinterpret_cast<U*>(base_ + offset);
  }
  size_t bytes() const { return size_t(used_); }

 private:
  char* base_;
  int64_t used_ = 0;
};

// out[c] = sum over r of partial[r * cols + c], r = 0, 1, ... in order (fp32), cast to PT.
// One thread per column: loads are coalesced across the warp, and the order never depends on
// the grid. With rows == 0 it writes zeros (an empty batch has zero parameter gradients).
template <typename PT>
__global__ void column_sum_kernel(const float* __restrict__ partial, int64_t rows, int64_t cols,
                                  PT* __restrict__ out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float acc = 0.f;
  for (int64_t r = 0; r < rows; ++r) acc += partial[r * cols + c];
  out[c] = from_float<PT>(acc);
}

template <typename PT>
inline cudaError_t launch_column_sum(const float* partial, int64_t rows, int64_t cols, PT* out,
                                     cudaStream_t stream) {
  if (cols == 0 || out == nullptr) return cudaSuccess;
  constexpr int kThreads = 256;
  column_sum_kernel<PT><<<unsigned(ceil_div(cols, kThreads)), kThreads, 0, stream>>>(
      partial, rows, cols, out);
  return cudaGetLastError();
}

template <typename U>  // a template so that every .cu may include this header
__global__ void fill_kernel(U* __restrict__ p, int64_t n, U value) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = value;
}

inline cudaError_t launch_fill(float* p, int64_t n, float value, cudaStream_t stream) {
  if (p == nullptr || n == 0) return cudaSuccess;
  fill_kernel<float><<<unsigned(ceil_div(n, 256)), 256, 0, stream>>>(p, n, value);
  return cudaGetLastError();
}

}  // namespace fastnorm
