// dtype dispatch over a plain enum: the kernels never see torch types.
//
// dispatch_types(x_dtype, param_dtype, f) calls f(Type<T>{}, Type<PT>{}) with T the element type
// of x/y/dy/dx and PT the element type of weight/bias/dweight/dbias. PT is either T or float (the
// mixed-precision case: half activations, fp32 parameters); any other pairing returns
// cudaErrorInvalidValue, and the caller (ops.cpp) casts the parameters to float first.
// fp64 is not dispatched: the router sends it to the Triton kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastnorm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
struct Type {
  using type = T;
};

template <typename F>
inline cudaError_t dispatch_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(Type<float>{});
    case DType::kFloat16: return f(Type<__half>{});
    case DType::kBFloat16: return f(Type<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
inline cudaError_t dispatch_types(DType dtype, DType param_dtype, F&& f) {
  return dispatch_type(dtype, [&](auto t) -> cudaError_t {
    using T = typename decltype(t)::type;
    if (param_dtype == dtype) return f(Type<T>{}, Type<T>{});
    if (param_dtype == DType::kFloat32) return f(Type<T>{}, Type<float>{});
    return cudaErrorInvalidValue;
  });
}

}  // namespace fastnorm
