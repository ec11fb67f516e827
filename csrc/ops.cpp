// The only torch-including file of fastnorm._C: registers the CUDA C++ kernels as the private
// ops `fastnorm_C::*`, whose schemas are the public `fastnorm::*` ones character for character
// (tests/test_cuda_binding.py checks), and implements them for CUDA tensors: argument checks
// (TORCH_CHECK, naming the argument), the device guard, the current stream, output and
// workspace allocation, then one `launch_<op>_<dir>` call into the torch-free kernels.
//
// Never `TORCH_LIBRARY(fastnorm)`: the public ops are defined once, in Python
// (fastnorm/ops/), and their router calls these when it picks the CUDA C++ kernel set. Ops the
// kernels lack (the fused residual add, the running-statistic update inside the statistics
// launch) and fp64 inputs are not registered / rejected here; the router sends them to Triton.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "launch.h"

namespace fastnorm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType to_dtype(const Tensor& t, const char* op, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastnorm_C::", op, ": expected ", what,
                  " in float32, float16 or bfloat16 (float64 runs the Triton kernels), got ",
                  t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const Tensor& x, const char* op, const char* what) {
  TORCH_CHECK(t.is_cuda(), "fastnorm_C::", op, ": expected ", what, " on a CUDA device, got ",
              t.device());
  TORCH_CHECK(t.device() == x.device(), "fastnorm_C::", op, ": expected ", what, " on ",
              x.device(), " (x's device), got ", t.device());
}

void check_shape(const Tensor& t, at::IntArrayRef shape, const char* op, const char* what) {
  TORCH_CHECK(t.sizes() == shape, "fastnorm_C::", op, ": expected ", what, " of shape ", shape,
              ", got ", t.sizes());
}

// A statistic the kernels read or write: fp32, the given shape, contiguous, on x's device.
void check_stats(const Tensor& t, const Tensor& x, at::IntArrayRef shape, const char* op,
                 const char* what) {
  check_cuda(t, x, op, what);
  check_shape(t, shape, op, what);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastnorm_C::", op, ": expected ", what,
              " in float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastnorm_C::", op, ": expected a contiguous ", what);
}

// weight / bias: [size], contiguous, x's dtype or fp32. Returns the parameter dtype of the pair
// (kFloat32 when they disagree: both are then cast to fp32, as dispatch.h expects).
struct Params {
  OptTensor weight, bias;
  DType dtype;
};

Params check_params(const OptTensor& weight, const OptTensor& bias, const Tensor& x,
                    int64_t size, const char* op) {
  Params p{weight, bias, to_dtype(x, op, "x")};
  bool any = false, all_x_dtype = true;
  for (auto* t : {&p.weight, &p.bias}) {
    if (!t->has_value()) continue;
    const char* what = t == &p.weight ? "weight" : "bias";
    check_cuda(**t, x, op, what);
    check_shape(**t, {size}, op, what);
    TORCH_CHECK((*t)->is_floating_point(), "fastnorm_C::", op, ": expected a floating-point ",
                what, ", got ", (*t)->scalar_type());
    **t = (*t)->contiguous();
    any = true;
    all_x_dtype = all_x_dtype && (*t)->scalar_type() == x.scalar_type();
  }
  if (any && !all_x_dtype) {
    for (auto* t : {&p.weight, &p.bias}) {
      if (t->has_value()) **t = (*t)->to(at::kFloat);
    }
    p.dtype = DType::kFloat32;
  }
  return p;
}

const void* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

Tensor param_grad_like(const OptTensor& param, const Tensor& x, DType dtype) {
  if (!param.has_value()) return at::empty({0}, x.options());
  return at::empty(param->sizes(), param->options().dtype(
                                       dtype == DType::kFloat32 ? at::kFloat : x.scalar_type()));
}

Tensor workspace(size_t bytes, const Tensor& x) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastnorm_C::", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

// The launchers that need scratch memory: allocate it (bytes on x's device, from the caching
// allocator, so it stays valid for the work queued on the current stream), then launch there.
template <class Args>
void launch_with_workspace(Args& a, size_t (*workspace_bytes)(const Args&),
                           cudaError_t (*launch)(const Args&, cudaStream_t), const Tensor& x,
                           const char* op) {
  Tensor ws = workspace(workspace_bytes(a), x);
  a.workspace = ws.data_ptr();
  a.workspace_bytes = static_cast<size_t>(ws.numel());
  check_launch(launch(a, at::cuda::getCurrentCUDAStream()), op);
}

// ---- LayerNorm / RMSNorm --------------------------------------------------------------------

Tensor rows_input(const Tensor& x, const char* op, const char* what) {
  TORCH_CHECK(x.dim() == 2, "fastnorm_C::", op, ": expected ", what, " to be 2-D (rows x "
              "features), got ", x.dim(), "-D");
  TORCH_CHECK(x.is_cuda(), "fastnorm_C::", op, ": expected ", what, " on a CUDA device, got ",
              x.device());
  // Row strides are passed to the kernels; a non-unit column stride is made contiguous.
  return x.numel() == 0 || x.stride(1) == 1 ? x : x.contiguous();
}

std::tuple<Tensor, Tensor, Tensor> norm_fwd(const Tensor& x_in, const OptTensor& weight,
                                            const OptTensor& bias, double eps, bool is_rms,
                                            const char* op) {
  const Tensor x = rows_input(x_in, op, "x");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = x.size(1);
  Params p = check_params(weight, is_rms ? OptTensor() : bias, x, n, op);
  Tensor y = at::empty({m, n}, x.options());
  Tensor mean = at::empty({is_rms ? 0 : m}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) {  // nothing to launch (a zero-sized grid is an invalid launch)
    if (n == 0) {  // as torch: no features, NaN statistics
      mean.fill_(std::numeric_limits<float>::quiet_NaN());
      rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    }
    return {y, mean, rstd};
  }
  LayerNormFwdArgs a;
  a.dtype = to_dtype(x, op, "x");
  a.param_dtype = p.dtype;
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.weight = ptr(p.weight);
  a.bias = ptr(p.bias);
  a.mean = is_rms ? nullptr : mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.M = m;
  a.N = n;
  a.x_row_stride = m > 0 ? x.stride(0) : n;
  a.y_row_stride = n;
  a.eps = static_cast<float>(eps);
  a.is_rms = is_rms;
  check_launch(launch_layer_norm_fwd(a, at::cuda::getCurrentCUDAStream()), op);
  return {y, mean, rstd};
}

// The LayerNorm / RMSNorm backward; rows_per_example > 0 is layer_norm_bwd_pe's per-example
// mode (dweight_sq / dbias_sq [M / rows_per_example] fp32, empty where there is no weight /
// bias), 0 the plain op (both empty).
using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

void launch_norm_bwd(const Tensor& dy, const Tensor& x, const Params& p, const OptTensor& weight,
                     const OptTensor& bias, const OptTensor& mean, const Tensor& rstd,
                     bool is_rms, int64_t rows_per_example, Tensor& dx, Tensor& dw, Tensor& db,
                     Tensor& dw_sq, Tensor& db_sq, const char* op);

Grads5 norm_bwd(const Tensor& dy_in, const Tensor& x_in, const OptTensor& weight,
                const OptTensor& bias, const OptTensor& mean, const Tensor& rstd, bool is_rms,
                int64_t rows_per_example, const char* op) {
  const Tensor x = rows_input(x_in, op, "x");
  const Tensor dy = rows_input(dy_in, op, "dy");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = x.size(1);
  check_cuda(dy, x, op, "dy");
  check_shape(dy, x.sizes(), op, "dy");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "fastnorm_C::", op,
              ": expected dy in x's dtype ", x.scalar_type(), ", got ", dy.scalar_type());
  if (!is_rms) check_stats(*mean, x, {m}, op, "mean");
  check_stats(rstd, x, {m}, op, "rstd");
  Params p = check_params(weight, bias, x, n, op);
  Tensor dx = at::empty({m, n}, x.options());
  Tensor dw = param_grad_like(weight, x, p.dtype);
  Tensor db = param_grad_like(is_rms ? OptTensor() : bias, x, p.dtype);
  const bool pe = rows_per_example > 0;
  if (pe) {
    TORCH_CHECK(m % rows_per_example == 0, "fastnorm_C::", op,
                ": expected rows_per_example >= 1 dividing the ", m, " rows of x, got ",
                rows_per_example);
  }
  const int64_t examples = pe ? m / rows_per_example : 0;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dw_sq = at::empty({pe && weight.has_value() ? examples : 0}, f32);
  Tensor db_sq = at::empty({pe && !is_rms && bias.has_value() ? examples : 0}, f32);
  if (m == 0 || n == 0) {  // nothing to launch: zero parameter gradients and norms, as torch
    dw.zero_();
    db.zero_();
    dw_sq.zero_();
    db_sq.zero_();
  } else {
    launch_norm_bwd(dy, x, p, weight, bias, mean, rstd, is_rms, rows_per_example, dx, dw, db,
                    dw_sq, db_sq, op);
  }
  // Gradients in the parameters' own dtypes (the public contract), whatever the kernel used.
  if (weight.has_value() && dw.scalar_type() != weight->scalar_type()) {
    dw = dw.to(weight->scalar_type());
  }
  if (!is_rms && bias.has_value() && db.scalar_type() != bias->scalar_type()) {
    db = db.to(bias->scalar_type());
  }
  return {dx, dw, db, dw_sq, db_sq};
}

void launch_norm_bwd(const Tensor& dy, const Tensor& x, const Params& p, const OptTensor& weight,
                     const OptTensor& bias, const OptTensor& mean, const Tensor& rstd,
                     bool is_rms, int64_t rows_per_example, Tensor& dx, Tensor& dw, Tensor& db,
                     Tensor& dw_sq, Tensor& db_sq, const char* op) {
  const int64_t m = x.size(0), n = x.size(1);
  const bool pe = rows_per_example > 0;
  LayerNormBwdArgs a;
  a.dtype = to_dtype(x, op, "x");
  a.param_dtype = p.dtype;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.weight = ptr(p.weight);
  a.mean = is_rms ? nullptr : mean->data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.dweight = weight.has_value() ? dw.data_ptr() : nullptr;
  a.dbias = !is_rms && bias.has_value() ? db.data_ptr() : nullptr;
  a.M = m;
  a.N = n;
  a.x_row_stride = m > 0 ? x.stride(0) : n;
  a.dy_row_stride = m > 0 ? dy.stride(0) : n;
  a.dx_row_stride = n;
  a.is_rms = is_rms;
  a.rows_per_example = pe ? rows_per_example : 0;
  a.dweight_sq = dw_sq.numel() > 0 ? dw_sq.data_ptr<float>() : nullptr;
  a.dbias_sq = db_sq.numel() > 0 ? db_sq.data_ptr<float>() : nullptr;
  launch_with_workspace(a, layer_norm_bwd_workspace_bytes, launch_layer_norm_bwd, x, op);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight,
                                                  const OptTensor& bias, double eps) {
  return norm_fwd(x, weight, bias, eps, false, "layer_norm_fwd");
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  const Tensor& mean, const Tensor& rstd) {
  auto [dx, dw, db, dw_sq, db_sq] =
      norm_bwd(dy, x, weight, bias, mean, rstd, false, 0, "layer_norm_bwd");
  return {dx, dw, db};
}

// fastnorm::layer_norm_bwd_pe: `mean` is empty (unread) and `bias` ignored when is_rms.
Grads5 layer_norm_bwd_pe(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                         const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                         bool is_rms, c10::SymInt rows_per_example) {
  const int64_t rpe = rows_per_example.expect_int();
  TORCH_CHECK(rpe >= 1, "fastnorm_C::layer_norm_bwd_pe: expected rows_per_example >= 1, got ",
              rpe);
  return norm_bwd(dy, x, weight, is_rms ? OptTensor() : bias,
                  is_rms ? OptTensor() : OptTensor(mean), rstd, is_rms, rpe,
                  "layer_norm_bwd_pe");
}

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const OptTensor& weight, double eps) {
  auto [y, mean, rstd] = norm_fwd(x, weight, std::nullopt, eps, true, "rms_norm_fwd");
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x,
                                        const OptTensor& weight, const Tensor& rstd) {
  auto [dx, dw, db, dw_sq, db_sq] =
      norm_bwd(dy, x, weight, std::nullopt, std::nullopt, rstd, true, 0, "rms_norm_bwd");
  return {dx, dw};
}

// ---- (N, C, S) views: GroupNorm and BatchNorm -----------------------------------------------

// The canonical view: contiguous or channels-last ((N, S, C) in memory); anything else is made
// contiguous. Returns the tensor and whether it is channels-last.
std::pair<Tensor, bool> channel_input(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3, "fastnorm_C::", op, ": expected x to be 3-D (N, C, S), got ",
              x.dim(), "-D");
  TORCH_CHECK(x.is_cuda(), "fastnorm_C::", op, ": expected x on a CUDA device, got ",
              x.device());
  if (x.is_contiguous()) return {x, false};
  if (x.transpose(1, 2).is_contiguous()) return {x, true};
  return {x.contiguous(), false};
}

// t (x's shape) in x's layout.
Tensor as_layout(const Tensor& t, bool channels_last) {
  if (!channels_last) return t.contiguous();
  return t.transpose(1, 2).is_contiguous() ? t : t.transpose(1, 2).contiguous().transpose(1, 2);
}

Tensor like_layout(const Tensor& x) { return at::empty_like(x); }  // keeps x's strides

Tensor grad_input(const Tensor& dy, const Tensor& x, bool channels_last, const char* op) {
  check_cuda(dy, x, op, "dy");
  check_shape(dy, x.sizes(), op, "dy");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "fastnorm_C::", op,
              ": expected dy in x's dtype ", x.scalar_type(), ", got ", dy.scalar_type());
  return as_layout(dy, channels_last);
}

// GroupNorm's activation argument ("none" | "silu", fastnorm/_layout.py) as the launchers' enum.
Activation gn_activation(const std::string& activation, const char* op) {
  TORCH_CHECK(activation == "none" || activation == "silu", "fastnorm_C::", op,
              ": activation must be 'none' or 'silu', got '", activation, "'");
  return activation == "silu" ? Activation::kSilu : Activation::kNone;
}

std::tuple<Tensor, Tensor, Tensor> group_norm_fwd(const Tensor& x_in, const OptTensor& weight,
                                                  const OptTensor& bias, c10::SymInt num_groups,
                                                  double eps, c10::string_view activation) {
  const char* op = "group_norm_fwd";
  auto [x, cl] = channel_input(x_in, op);
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  const int64_t g = num_groups.expect_int();
  TORCH_CHECK(g > 0 && c % g == 0, "fastnorm_C::", op, ": expected num_groups > 0 dividing the ",
              c, " channels, got num_groups=", g);
  Params p = check_params(weight, bias, x, c, op);
  Tensor y = like_layout(x);
  Tensor mean = at::empty({n, g}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({n, g}, x.options().dtype(at::kFloat));
  GroupNormFwdArgs a;
  a.activation = gn_activation(std::string(activation), op);
  a.dtype = to_dtype(x, op, "x");
  a.param_dtype = p.dtype;
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.weight = ptr(p.weight);
  a.bias = ptr(p.bias);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.N = n;
  a.C = c;
  a.HW = s;
  a.G = g;
  a.eps = static_cast<float>(eps);
  a.channels_last = cl;
  launch_with_workspace(a, group_norm_fwd_workspace_bytes, launch_group_norm_fwd, x, op);
  return {y, mean, rstd};
}

// The GroupNorm backward; pe: group_norm_bwd_pe's per-sample dweight_sq / dbias_sq [N] fp32
// (empty where there is no weight / bias; both empty for the plain op).
Grads5 gn_bwd(const Tensor& dy_in, const Tensor& x_in, const OptTensor& weight,
              const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
              c10::SymInt num_groups, c10::string_view activation, bool pe, const char* op) {
  auto [x, cl] = channel_input(x_in, op);
  const at::cuda::CUDAGuard guard(x.device());
  const Tensor dy = grad_input(dy_in, x, cl, op);
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  const int64_t g = num_groups.expect_int();
  TORCH_CHECK(g > 0 && c % g == 0, "fastnorm_C::", op, ": expected num_groups > 0 dividing the ",
              c, " channels, got num_groups=", g);
  check_stats(mean, x, {n, g}, op, "mean");
  check_stats(rstd, x, {n, g}, op, "rstd");
  Params p = check_params(weight, bias, x, c, op);
  Tensor dx = like_layout(x);
  Tensor dw = param_grad_like(weight, x, p.dtype);
  Tensor db = param_grad_like(bias, x, p.dtype);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dw_sq = at::empty({pe && weight.has_value() ? n : 0}, f32);
  Tensor db_sq = at::empty({pe && bias.has_value() ? n : 0}, f32);
  GroupNormBwdArgs a;
  a.activation = gn_activation(std::string(activation), op);
  a.dtype = to_dtype(x, op, "x");
  a.param_dtype = p.dtype;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.weight = ptr(p.weight);
  a.bias = ptr(p.bias);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.dweight = weight.has_value() ? dw.data_ptr() : nullptr;
  a.dbias = bias.has_value() ? db.data_ptr() : nullptr;
  a.N = n;
  a.C = c;
  a.HW = s;
  a.G = g;
  a.channels_last = cl;
  a.dweight_sq = dw_sq.numel() > 0 ? dw_sq.data_ptr<float>() : nullptr;
  a.dbias_sq = db_sq.numel() > 0 ? db_sq.data_ptr<float>() : nullptr;
  launch_with_workspace(a, group_norm_bwd_workspace_bytes, launch_group_norm_bwd, x, op);
  if (weight.has_value() && dw.scalar_type() != weight->scalar_type()) {
    dw = dw.to(weight->scalar_type());
  }
  if (bias.has_value() && db.scalar_type() != bias->scalar_type()) {
    db = db.to(bias->scalar_type());
  }
  return {dx, dw, db, dw_sq, db_sq};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  c10::SymInt num_groups,
                                                  c10::string_view activation) {
  auto [dx, dw, db, dw_sq, db_sq] = gn_bwd(dy, x, weight, bias, mean, rstd, num_groups,
                                           activation, false, "group_norm_bwd");
  return {dx, dw, db};
}

Grads5 group_norm_bwd_pe(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                         const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                         c10::SymInt num_groups, c10::string_view activation) {
  return gn_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation, true,
                "group_norm_bwd_pe");
}

// BatchNorm: the launch structs share their (N, C, S, layout, eps, relu) fields.
template <typename Args>
void fill_bn(Args& a, const Tensor& x, bool cl, const char* op) {
  a.dtype = to_dtype(x, op, "x");
  a.x = x.data_ptr();
  a.N = x.size(0);
  a.C = x.size(1);
  a.S = x.size(2);
  a.channels_last = cl;
}

Tensor channel_stat(const Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& x_in) {
  const char* op = "batch_norm_stats";
  auto [x, cl] = channel_input(x_in, op);
  const at::cuda::CUDAGuard guard(x.device());
  Tensor mean = channel_stat(x), var = channel_stat(x);
  BatchNormStatsArgs a;
  fill_bn(a, x, cl, op);
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  launch_with_workspace(a, batch_norm_stats_workspace_bytes, launch_batch_norm_stats, x, op);
  return {mean, var};
}

Tensor apply_impl(const Tensor& x_in, const Tensor& mean, const Tensor& var,
                  const OptTensor& weight, const OptTensor& bias, double eps, bool relu,
                  const char* op) {
  auto [x, cl] = channel_input(x_in, op);
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t c = x.size(1);
  check_stats(mean, x, {c}, op, "mean");
  check_stats(var, x, {c}, op, "var");
  Params p = check_params(weight, bias, x, c, op);
  Tensor y = like_layout(x);
  BatchNormApplyArgs a;
  fill_bn(a, x, cl, op);
  a.param_dtype = p.dtype;
  a.y = y.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  a.weight = ptr(p.weight);
  a.bias = ptr(p.bias);
  a.eps = static_cast<float>(eps);
  a.relu = relu;
  launch_with_workspace(a, batch_norm_apply_workspace_bytes, launch_batch_norm_apply, x, op);
  return y;
}

Tensor batch_norm_apply(const Tensor& x, const Tensor& mean, const Tensor& var,
                        const OptTensor& weight, const OptTensor& bias, double eps, bool relu) {
  return apply_impl(x, mean, var, weight, bias, eps, relu, "batch_norm_apply");
}

Tensor batch_norm_train_apply(const Tensor& x, const Tensor& mean, const Tensor& var,
                              const OptTensor& weight, const OptTensor& bias, double eps,
                              bool relu) {
  return apply_impl(x, mean, var, weight, bias, eps, relu, "batch_norm_train_apply");
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& dy_in, const Tensor& x_in,
                                                      const Tensor& mean, const Tensor& var,
                                                      const OptTensor& weight,
                                                      const OptTensor& bias, double eps,
                                                      bool relu) {
  const char* op = "batch_norm_backward_reduce";
  auto [x, cl] = channel_input(x_in, op);
  const at::cuda::CUDAGuard guard(x.device());
  const Tensor dy = grad_input(dy_in, x, cl, op);
  const int64_t c = x.size(1);
  check_stats(mean, x, {c}, op, "mean");
  check_stats(var, x, {c}, op, "var");
  Params p = check_params(weight, bias, x, c, op);
  Tensor sum_dy = channel_stat(x), sum_dy_xhat = channel_stat(x);
  BatchNormBwdReduceArgs a;
  fill_bn(a, x, cl, op);
  a.param_dtype = p.dtype;
  a.dy = dy.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  a.weight = ptr(p.weight);
  a.bias = ptr(p.bias);
  a.sum_dy = sum_dy.data_ptr<float>();
  a.sum_dy_xhat = sum_dy_xhat.data_ptr<float>();
  a.eps = static_cast<float>(eps);
  a.relu = relu;
  launch_with_workspace(a, batch_norm_bwd_reduce_workspace_bytes, launch_batch_norm_bwd_reduce, x,
                        op);
  return {sum_dy, sum_dy_xhat};
}

Tensor batch_norm_backward_elemt(const Tensor& dy_in, const Tensor& x_in, const Tensor& mean,
                                 const Tensor& var, const OptTensor& weight,
                                 const OptTensor& bias, const Tensor& sum_dy,
                                 const Tensor& sum_dy_xhat, const Tensor& count, double eps,
                                 bool relu) {
  const char* op = "batch_norm_backward_elemt";
  auto [x, cl] = channel_input(x_in, op);
  const at::cuda::CUDAGuard guard(x.device());
  const Tensor dy = grad_input(dy_in, x, cl, op);
  const int64_t c = x.size(1);
  check_stats(mean, x, {c}, op, "mean");
  check_stats(var, x, {c}, op, "var");
  check_stats(sum_dy, x, {c}, op, "sum_dy");
  check_stats(sum_dy_xhat, x, {c}, op, "sum_dy_xhat");
  check_cuda(count, x, op, "count");
  TORCH_CHECK(count.numel() == 1, "fastnorm_C::", op, ": expected count as a 1-element tensor, "
              "got shape ", count.sizes());
  const Tensor count32 = count.to(at::kFloat).contiguous();
  Params p = check_params(weight, bias, x, c, op);
  Tensor dx = like_layout(x);
  BatchNormBwdElemtArgs a;
  fill_bn(a, x, cl, op);
  a.param_dtype = p.dtype;
  a.dy = dy.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  a.weight = ptr(p.weight);
  a.bias = ptr(p.bias);
  a.sum_dy = sum_dy.data_ptr<float>();
  a.sum_dy_xhat = sum_dy_xhat.data_ptr<float>();
  a.count = count32.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.eps = static_cast<float>(eps);
  a.relu = relu;
  launch_with_workspace(a, batch_norm_bwd_elemt_workspace_bytes, launch_batch_norm_bwd_elemt, x,
                        op);
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_fwd(const Tensor& x_in, const OptTensor& weight,
                                                  const OptTensor& bias, double eps, bool relu) {
  const char* op = "batch_norm_fwd";
  auto [x, cl] = channel_input(x_in, op);
  const at::cuda::CUDAGuard guard(x.device());
  Params p = check_params(weight, bias, x, x.size(1), op);
  Tensor y = like_layout(x);
  Tensor mean = channel_stat(x), var = channel_stat(x);
  BatchNormFwdArgs a;
  fill_bn(a, x, cl, op);
  a.param_dtype = p.dtype;
  a.y = y.data_ptr();
  a.weight = ptr(p.weight);
  a.bias = ptr(p.bias);
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  a.eps = static_cast<float>(eps);
  a.relu = relu;
  launch_with_workspace(a, batch_norm_fwd_workspace_bytes, launch_batch_norm_fwd, x, op);
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_bwd(const Tensor& dy_in, const Tensor& x_in,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  const Tensor& mean, const Tensor& var,
                                                  double eps, bool relu, bool training) {
  const char* op = "batch_norm_bwd";
  auto [x, cl] = channel_input(x_in, op);
  const at::cuda::CUDAGuard guard(x.device());
  const Tensor dy = grad_input(dy_in, x, cl, op);
  const int64_t c = x.size(1);
  check_stats(mean, x, {c}, op, "mean");
  check_stats(var, x, {c}, op, "var");
  Params p = check_params(weight, bias, x, c, op);
  Tensor dx = like_layout(x);
  Tensor sum_dy = channel_stat(x), sum_dy_xhat = channel_stat(x);
  BatchNormBwdArgs a;
  fill_bn(a, x, cl, op);
  a.param_dtype = p.dtype;
  a.dy = dy.data_ptr();
  a.weight = ptr(p.weight);
  a.bias = ptr(p.bias);
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.sum_dy = sum_dy.data_ptr<float>();
  a.sum_dy_xhat = sum_dy_xhat.data_ptr<float>();
  a.eps = static_cast<float>(eps);
  a.relu = relu;
  a.training = training;
  launch_with_workspace(a, batch_norm_bwd_workspace_bytes, launch_batch_norm_bwd, x, op);
  // dweight = sum(g * x_hat), dbias = sum(g), in the parameters' dtypes (empty when absent).
  Tensor dw = weight.has_value() ? sum_dy_xhat.to(weight->scalar_type())
                                 : at::empty({0}, x.options());
  Tensor db = bias.has_value() ? sum_dy.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace

// Schemas: identical to the public fastnorm:: ones (fastnorm/ops/*.py), one per line.
TORCH_LIBRARY(fastnorm_C, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd_pe(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, bool is_rms, SymInt rows_per_example) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("group_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, SymInt num_groups, float eps, str activation) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, SymInt num_groups, str activation) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_bwd_pe(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, SymInt num_groups, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("batch_norm_apply(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, bool relu) -> Tensor");
  m.def("batch_norm_backward_reduce(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, bool relu) -> (Tensor, Tensor)");
  m.def("batch_norm_backward_elemt(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor sum_dy, Tensor sum_dy_xhat, Tensor count, float eps, bool relu) -> Tensor");
  m.def("batch_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, bool relu, bool training) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_train_apply(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastnorm_C, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("layer_norm_bwd_pe", &layer_norm_bwd_pe);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("group_norm_fwd", &group_norm_fwd);
  m.impl("group_norm_bwd", &group_norm_bwd);
  m.impl("group_norm_bwd_pe", &group_norm_bwd_pe);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_apply", &batch_norm_apply);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
  m.impl("batch_norm_fwd", &batch_norm_fwd);
  m.impl("batch_norm_bwd", &batch_norm_bwd);
  m.impl("batch_norm_train_apply", &batch_norm_train_apply);
}

}  // namespace fastnorm

// `import fastnorm._C` loads this library; the ops register at load time (static initializers),
// so the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
