// Torch-free GPU self-test of every launcher in launch.h against a float64 CPU reference.
//
//   nvcc -std=c++17 -O2 -I csrc/include csrc/selftest/kernel_selftest.cu csrc/*.cu -o selftest
//   ./selftest            # all cases; exit status 1 on any failure
//   ./selftest quick      # a few shapes per kernel (for compute-sanitizer runs)
//   ./selftest bench      # LayerNorm / RMSNorm bf16 bandwidth (ideal bytes / median time)
//
// Each case runs twice and also checks that the outputs are bitwise identical (deterministic
// reductions). Shapes cover every path: LayerNorm register / cluster (sm_90) / fallback
// (misaligned pointer, odd N, long rows), GroupNorm and BatchNorm in both layouts with their
// fused activations, empty inputs. Built and run only by the GPU check: CI compiles and links it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <functional>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"

using namespace fastnorm;

namespace {

int g_failures = 0;
int g_cases = 0;

#define CUDA_OK(expr)                                                                    \
  do {                                                                                   \
    cudaError_t err_ = (expr);                                                           \
    if (err_ != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__,      \
                  __LINE__, #expr);                                                      \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)

uint64_t g_rng = 0x9E3779B97F4A7C15ull;
double uniform() {  // [-1, 1)
  g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
  return double((g_rng >> 11) & ((1ull << 53) - 1)) / double(1ull << 52) - 1.0;
}

// Host-side element types.
struct HostType {
  DType dtype;
  size_t size;
  const char* name;
  double atol, rtol;
};
const HostType kF32{DType::kFloat32, 4, "fp32", 2e-4, 2e-4};
const HostType kF16{DType::kFloat16, 2, "fp16", 4e-3, 4e-3};
const HostType kBF16{DType::kBFloat16, 2, "bf16", 3e-2, 2e-2};

void encode(const HostType& t, double v, void* dst) {
  if (t.dtype == DType::kFloat32) {
    float f = float(v);
    std::memcpy(dst, &f, 4);
  } else if (t.dtype == DType::kFloat16) {
    __half h = __float2half(float(v));
    std::memcpy(dst, &h, 2);
  } else {
    __nv_bfloat16 h = __float2bfloat16(float(v));
    std::memcpy(dst, &h, 2);
  }
}
double decode(const HostType& t, const void* src) {
  if (t.dtype == DType::kFloat32) {
    float f;
    std::memcpy(&f, src, 4);
    return f;
  }
  if (t.dtype == DType::kFloat16) {
    __half h;
    std::memcpy(&h, src, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, src, 2);
  return __bfloat162float(h);
}

// A device buffer of n elements of type t, `offset` elements past a 256-byte aligned allocation
// (offset 1 makes it misaligned for the 16-byte vector paths).
struct Buf {
  HostType t;
  int64_t n = 0;
  void* base = nullptr;
  void* ptr = nullptr;
  Buf(const HostType& type, int64_t count, int offset = 0) : t(type), n(count) {
    CUDA_OK(cudaMalloc(&base, size_t(count + offset + 1) * t.size + 16));
    CUDA_OK(cudaMemset(base, 0xFF, size_t(count + offset + 1) * t.size + 16));  // NaN garbage
    ptr = static_cast<char*>(base) + offset * t.size;
  }
  ~Buf() { cudaFree(base); }
  Buf(const Buf&) = delete;
  void upload(const std::vector<double>& v) {
    std::vector<char> h(size_t(n) * t.size);
    for (int64_t i = 0; i < n; ++i) encode(t, v[i], &h[size_t(i) * t.size]);
    CUDA_OK(cudaMemcpy(ptr, h.data(), h.size(), cudaMemcpyHostToDevice));
  }
  std::vector<double> download() const {
    std::vector<char> h(size_t(n) * t.size);
    CUDA_OK(cudaMemcpy(h.data(), ptr, h.size(), cudaMemcpyDeviceToHost));
    std::vector<double> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = decode(t, &h[size_t(i) * t.size]);
    return v;
  }
  std::vector<char> raw() const {
    std::vector<char> h(size_t(n) * t.size);
    CUDA_OK(cudaMemcpy(h.data(), ptr, h.size(), cudaMemcpyDeviceToHost));
    return h;
  }
};

// Values rounded to type t, so the reference sees exactly what the kernel reads.
std::vector<double> random_values(const HostType& t, int64_t n, double scale, double shift) {
  std::vector<double> v(n);
  char tmp[4];
  for (auto& x : v) {
    encode(t, shift + scale * uniform(), tmp);
    x = decode(t, tmp);
  }
  return v;
}

bool close(const char* what, const std::vector<double>& got, const std::vector<double>& ref,
           double atol, double rtol, std::string* msg) {
  double worst = 0;
  int64_t worst_i = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(got[i] - ref[i]);
    const double lim = atol + rtol * std::fabs(ref[i]);
    const bool bad = !(err <= lim) && !(std::isnan(ref[i]) && std::isnan(got[i]));
    if (bad && (worst_i < 0 || err / lim > worst)) {
      worst = std::isnan(err) ? 1e300 : err / lim;
      worst_i = int64_t(i);
    }
  }
  if (worst_i >= 0) {
    char buf[256];
    std::snprintf(buf, sizeof buf, " %s[%lld]: got %.6g want %.6g;", what, (long long)worst_i,
                  got[worst_i], ref[worst_i]);
    *msg += buf;
    return false;
  }
  return true;
}

void report(const std::string& name, bool ok, const std::string& msg) {
  ++g_cases;
  if (!ok) ++g_failures;
  std::printf("%s %s%s\n", ok ? "PASS" : "FAIL", name.c_str(), msg.c_str());
}

struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit Workspace(size_t n) : bytes(n) {
    if (n) CUDA_OK(cudaMalloc(&ptr, n));
  }
  ~Workspace() { cudaFree(ptr); }
};

// ---- LayerNorm / RMSNorm ----------------------------------------------------------------------

// Per-example squared norms of the dW / dB contributions (rows_per_example consecutive rows an
// example), summed over the example's rows before squaring, in double.
void per_example_sq(const std::vector<double>& dy, const std::vector<double>& x,
                    const std::vector<double>& mean, const std::vector<double>& rstd, int64_t M,
                    int64_t N, int64_t rpe, std::vector<double>* dw_sq,
                    std::vector<double>* db_sq) {
  dw_sq->assign(M / rpe, 0.0);
  db_sq->assign(M / rpe, 0.0);
  for (int64_t e = 0; e < M / rpe; ++e)
    for (int64_t i = 0; i < N; ++i) {
      double w = 0, b = 0;
      for (int64_t r = e * rpe; r < (e + 1) * rpe; ++r) {
        w += dy[r * N + i] * (x[r * N + i] - mean[r]) * rstd[r];
        b += dy[r * N + i];
      }
      (*dw_sq)[e] += w * w;
      (*db_sq)[e] += b * b;
    }
}

// rpe > 0: also the per-example mode (LayerNormBwdArgs::rows_per_example), whose dx / dW / dB
// must be bitwise the plain mode's and whose squared norms must match per_example_sq.
void test_layer_norm(const HostType& t, const HostType& pt, int64_t M, int64_t N, bool rms,
                     bool has_w, bool has_b, int offset, int64_t rpe = 0) {
  has_b = has_b && !rms;
  const double eps = 1e-5;
  std::vector<double> x = random_values(t, M * N, 2.0, rms ? 0.0 : 3.0);
  std::vector<double> dy = random_values(t, M * N, 1.0, 0.0);
  std::vector<double> w = random_values(pt, N, 0.5, 1.0), b = random_values(pt, N, 0.5, 0.0);
  // Reference.
  std::vector<double> y(M * N), dx(M * N), mean(M), rstd(M), dw(N, 0.0), db(N, 0.0);
  for (int64_t r = 0; r < M; ++r) {
    double m = 0, v = 0;
    if (!rms) {
      for (int64_t i = 0; i < N; ++i) m += x[r * N + i];
      m /= double(N);
    }
    for (int64_t i = 0; i < N; ++i) v += (x[r * N + i] - m) * (x[r * N + i] - m);
    v /= double(N);
    mean[r] = m;
    rstd[r] = 1.0 / std::sqrt(v + eps);
    double c1 = 0, c2 = 0;
    for (int64_t i = 0; i < N; ++i) {
      const double xh = (x[r * N + i] - m) * rstd[r];
      y[r * N + i] = xh * (has_w ? w[i] : 1.0) + (has_b ? b[i] : 0.0);
      const double g = dy[r * N + i] * (has_w ? w[i] : 1.0);
      c1 += xh * g;
      c2 += g;
      dw[i] += dy[r * N + i] * xh;
      db[i] += dy[r * N + i];
    }
    c1 /= double(N);
    c2 = rms ? 0.0 : c2 / double(N);
    for (int64_t i = 0; i < N; ++i) {
      const double xh = (x[r * N + i] - m) * rstd[r];
      const double g = dy[r * N + i] * (has_w ? w[i] : 1.0);
      dx[r * N + i] = rstd[r] * (g - (xh * c1 + c2));
    }
  }
  Buf dx_buf(t, M * N), y_buf(t, M * N, offset), x_buf(t, M * N, offset), dy_buf(t, M * N, offset);
  Buf w_buf(pt, N), b_buf(pt, N), dw_buf(pt, N), db_buf(pt, N);
  Buf mean_buf(kF32, M), rstd_buf(kF32, M);
  x_buf.upload(x);
  dy_buf.upload(dy);
  w_buf.upload(w);
  b_buf.upload(b);
  LayerNormFwdArgs f;
  f.dtype = t.dtype;
  f.param_dtype = pt.dtype;
  f.x = x_buf.ptr;
  f.y = y_buf.ptr;
  f.weight = has_w ? w_buf.ptr : nullptr;
  f.bias = has_b ? b_buf.ptr : nullptr;
  f.mean = static_cast<float*>(mean_buf.ptr);
  f.rstd = static_cast<float*>(rstd_buf.ptr);
  f.M = M, f.N = N, f.x_row_stride = N, f.y_row_stride = N;
  f.eps = float(eps);
  f.is_rms = rms;
  LayerNormBwdArgs g;
  g.dtype = t.dtype;
  g.param_dtype = pt.dtype;
  g.dy = dy_buf.ptr;
  g.x = x_buf.ptr;
  g.weight = f.weight;
  g.mean = f.mean;
  g.rstd = f.rstd;
  g.dx = dx_buf.ptr;
  g.dweight = has_w ? dw_buf.ptr : nullptr;
  g.dbias = has_b ? db_buf.ptr : nullptr;
  g.M = M, g.N = N, g.x_row_stride = N, g.dy_row_stride = N, g.dx_row_stride = N;
  g.is_rms = rms;
  Workspace ws(layer_norm_bwd_workspace_bytes(g));
  g.workspace = ws.ptr;
  g.workspace_bytes = ws.bytes;
  std::vector<char> first[4];
  std::string msg;
  bool ok = true;
  for (int rep = 0; rep < 2; ++rep) {
    CUDA_OK(launch_layer_norm_fwd(f, nullptr));
    CUDA_OK(launch_layer_norm_bwd(g, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<char> now[4] = {y_buf.raw(), dx_buf.raw(), dw_buf.raw(), rstd_buf.raw()};
    if (rep == 0) {
      for (int k = 0; k < 4; ++k) first[k] = now[k];
    } else {
      for (int k = 0; k < 4; ++k)
        if (now[k] != first[k]) {
          ok = false;
          msg += " not deterministic;";
        }
    }
  }
  const double sum_tol = t.atol * std::sqrt(double(M)) * 4;
  ok &= close("y", y_buf.download(), y, t.atol, t.rtol, &msg);
  ok &= close("rstd", rstd_buf.download(), rstd, 1e-5, 1e-4, &msg);
  if (!rms) ok &= close("mean", mean_buf.download(), mean, 1e-5, 1e-5, &msg);
  ok &= close("dx", dx_buf.download(), dx, t.atol * 2, t.rtol * 2, &msg);
  if (has_w) ok &= close("dw", dw_buf.download(), dw, sum_tol, pt.rtol * 2, &msg);
  if (has_b) ok &= close("db", db_buf.download(), db, sum_tol, pt.rtol * 2, &msg);
  if (rpe > 0) {
    Buf pdx(t, M * N), pdw(pt, N), pdb(pt, N), dw_sq(kF32, M / rpe), db_sq(kF32, M / rpe);
    LayerNormBwdArgs p = g;
    p.dx = pdx.ptr;
    p.dweight = has_w ? pdw.ptr : nullptr;
    p.dbias = has_b ? pdb.ptr : nullptr;
    p.rows_per_example = rpe;
    p.dweight_sq = has_w ? static_cast<float*>(dw_sq.ptr) : nullptr;
    p.dbias_sq = has_b ? static_cast<float*>(db_sq.ptr) : nullptr;
    Workspace pws(layer_norm_bwd_workspace_bytes(p));
    p.workspace = pws.ptr;
    p.workspace_bytes = pws.bytes;
    std::vector<char> sq_first[2];
    for (int rep = 0; rep < 2; ++rep) {
      CUDA_OK(launch_layer_norm_bwd(p, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      if (rep == 0) {
        sq_first[0] = dw_sq.raw(), sq_first[1] = db_sq.raw();
      } else if (sq_first[0] != dw_sq.raw() || sq_first[1] != db_sq.raw()) {
        ok = false;
        msg += " per-example not deterministic;";
      }
    }
    if (pdx.raw() != dx_buf.raw() || (has_w && pdw.raw() != dw_buf.raw()) ||
        (has_b && pdb.raw() != db_buf.raw())) {
      ok = false;
      msg += " per-example dx/dw/db differ from the plain mode;";
    }
    std::vector<double> rw, rb;
    per_example_sq(dy, x, mean, rstd, M, N, rpe, &rw, &rb);
    const double sq_atol = 1e-5 * double(N * rpe);
    if (has_w) ok &= close("dw_sq", dw_sq.download(), rw, sq_atol, 2e-3, &msg);
    if (has_b) ok &= close("db_sq", db_sq.download(), rb, sq_atol, 2e-3, &msg);
  }
  char name[160];
  std::snprintf(name, sizeof name, "%s %s/%s M=%lld N=%lld w=%d b=%d offset=%d%s",
                rms ? "rms_norm" : "layer_norm", t.name, pt.name, (long long)M, (long long)N,
                int(has_w), int(has_b), offset,
                rpe > 0 ? (" rows_per_example=" + std::to_string(rpe)).c_str() : "");
  report(name, ok, msg);
}

// ---- GroupNorm ----------------------------------------------------------------------------------

int64_t at(bool cl, int64_t C, int64_t S, int64_t n, int64_t c, int64_t s) {
  return cl ? (n * S + s) * C + c : (n * C + c) * S + s;
}

double silu(double z) { return z / (1.0 + std::exp(-z)); }

void test_group_norm(const HostType& t, const HostType& pt, int64_t N, int64_t C, int64_t HW,
                     int64_t G, bool cl, bool act, bool affine) {
  const double eps = 1e-5;
  const int64_t total = N * C * HW, cg = C / G;
  std::vector<double> x = random_values(t, total, 2.0, 5.0), dy = random_values(t, total, 1, 0);
  std::vector<double> w = random_values(pt, C, 0.5, 1.0), b = random_values(pt, C, 0.5, 0.0);
  std::vector<double> y(total), dx(total), mean(N * G), rstd(N * G), dw(C, 0.0), db(C, 0.0);
  std::vector<double> dw_n(C), db_n(C), dw_sq(N, 0.0), db_sq(N, 0.0);  // per-sample norms
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double m = 0, v = 0;
      const double cnt = double(cg * HW);
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c)
        for (int64_t s = 0; s < HW; ++s) m += x[at(cl, C, HW, n, c, s)];
      m /= cnt;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c)
        for (int64_t s = 0; s < HW; ++s) v += std::pow(x[at(cl, C, HW, n, c, s)] - m, 2);
      const double r = 1.0 / std::sqrt(v / cnt + eps);
      mean[n * G + g] = m;
      rstd[n * G + g] = r;
      double c1 = 0, c2 = 0;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const double wc = affine ? w[c] : 1.0, bc = affine ? b[c] : 0.0;
        for (int64_t s = 0; s < HW; ++s) {
          const int64_t i = at(cl, C, HW, n, c, s);
          const double xh = (x[i] - m) * r, z = xh * wc + bc;
          y[i] = act ? silu(z) : z;
          const double sg = 1.0 / (1.0 + std::exp(-z));
          const double dz = act ? dy[i] * (sg + z * sg * (1 - sg)) : dy[i];
          dw[c] += dz * xh;
          db[c] += dz;
          c1 += wc * dz * xh;
          c2 += wc * dz;
        }
      }
      c1 /= cnt;
      c2 /= cnt;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const double wc = affine ? w[c] : 1.0, bc = affine ? b[c] : 0.0;
        dw_n[c] = db_n[c] = 0.0;
        for (int64_t s = 0; s < HW; ++s) {
          const int64_t i = at(cl, C, HW, n, c, s);
          const double xh = (x[i] - m) * r, z = xh * wc + bc;
          const double sg = 1.0 / (1.0 + std::exp(-z));
          const double dz = act ? dy[i] * (sg + z * sg * (1 - sg)) : dy[i];
          dx[i] = r * (wc * dz - (xh * c1 + c2));
          dw_n[c] += dz * xh;
          db_n[c] += dz;
        }
        dw_sq[n] += dw_n[c] * dw_n[c];
        db_sq[n] += db_n[c] * db_n[c];
      }
    }
  Buf x_buf(t, total), dy_buf(t, total), y_buf(t, total), dx_buf(t, total);
  Buf w_buf(pt, C), b_buf(pt, C), dw_buf(pt, C), db_buf(pt, C), mean_buf(kF32, N * G),
      rstd_buf(kF32, N * G);
  x_buf.upload(x);
  dy_buf.upload(dy);
  w_buf.upload(w);
  b_buf.upload(b);
  GroupNormFwdArgs f;
  f.dtype = t.dtype;
  f.param_dtype = pt.dtype;
  f.x = x_buf.ptr;
  f.y = y_buf.ptr;
  f.weight = affine ? w_buf.ptr : nullptr;
  f.bias = affine ? b_buf.ptr : nullptr;
  f.mean = static_cast<float*>(mean_buf.ptr);
  f.rstd = static_cast<float*>(rstd_buf.ptr);
  f.N = N, f.C = C, f.HW = HW, f.G = G;
  f.eps = float(eps);
  f.channels_last = cl;
  f.activation = act ? Activation::kSilu : Activation::kNone;
  GroupNormBwdArgs g;
  g.dtype = t.dtype;
  g.param_dtype = pt.dtype;
  g.dy = dy_buf.ptr;
  g.x = x_buf.ptr;
  g.weight = f.weight;
  g.bias = f.bias;
  g.mean = f.mean;
  g.rstd = f.rstd;
  g.dx = dx_buf.ptr;
  g.dweight = dw_buf.ptr;
  g.dbias = db_buf.ptr;
  g.N = N, g.C = C, g.HW = HW, g.G = G;
  g.channels_last = cl;
  g.activation = f.activation;
  Workspace wf(group_norm_fwd_workspace_bytes(f)), wb(group_norm_bwd_workspace_bytes(g));
  f.workspace = wf.ptr, f.workspace_bytes = wf.bytes;
  g.workspace = wb.ptr, g.workspace_bytes = wb.bytes;
  std::string msg;
  bool ok = true;
  std::vector<char> first_y, first_dx;
  for (int rep = 0; rep < 2; ++rep) {
    CUDA_OK(launch_group_norm_fwd(f, nullptr));
    CUDA_OK(launch_group_norm_bwd(g, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    if (rep == 0) {
      first_y = y_buf.raw(), first_dx = dx_buf.raw();
    } else if (first_y != y_buf.raw() || first_dx != dx_buf.raw()) {
      ok = false;
      msg += " not deterministic;";
    }
  }
  const double sum_tol = t.atol * std::sqrt(double(N * HW)) * 4;
  if (total > 0) {
    ok &= close("y", y_buf.download(), y, t.atol, t.rtol, &msg);
    ok &= close("dx", dx_buf.download(), dx, t.atol * 2, t.rtol * 2, &msg);
    ok &= close("mean", mean_buf.download(), mean, 1e-5, 1e-5, &msg);
    ok &= close("rstd", rstd_buf.download(), rstd, 1e-5, 1e-4, &msg);
  }
  ok &= close("dw", dw_buf.download(), dw, sum_tol, pt.rtol * 2, &msg);
  ok &= close("db", db_buf.download(), db, sum_tol, pt.rtol * 2, &msg);
  {  // per-sample norms (group_norm_bwd_pe): dx / dW / dB bitwise the plain ones
    Buf pdx(t, total), pdw(pt, C), pdb(pt, C), pw_sq(kF32, N), pb_sq(kF32, N);
    GroupNormBwdArgs p = g;
    p.dx = pdx.ptr, p.dweight = pdw.ptr, p.dbias = pdb.ptr;
    p.dweight_sq = static_cast<float*>(pw_sq.ptr);
    p.dbias_sq = static_cast<float*>(pb_sq.ptr);
    Workspace pws(group_norm_bwd_workspace_bytes(p));
    p.workspace = pws.ptr, p.workspace_bytes = pws.bytes;
    CUDA_OK(launch_group_norm_bwd(p, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    if (pdx.raw() != dx_buf.raw() || pdw.raw() != dw_buf.raw() || pdb.raw() != db_buf.raw()) {
      ok = false;
      msg += " per-sample dx/dw/db differ from the plain mode;";
    }
    const double sq_atol = 1e-5 * double(C * HW);
    ok &= close("dw_sq", pw_sq.download(), dw_sq, sq_atol, 2e-3, &msg);
    ok &= close("db_sq", pb_sq.download(), db_sq, sq_atol, 2e-3, &msg);
  }
  char name[160];
  std::snprintf(name, sizeof name, "group_norm %s/%s N=%lld C=%lld HW=%lld G=%lld %s silu=%d affine=%d",
                t.name, pt.name, (long long)N, (long long)C, (long long)HW, (long long)G,
                cl ? "CL" : "NCHW", int(act), int(affine));
  report(name, ok, msg);
}

// ---- BatchNorm ----------------------------------------------------------------------------------

void test_batch_norm(const HostType& t, const HostType& pt, int64_t N, int64_t C, int64_t S,
                     bool cl, bool relu, bool training) {
  const double eps = 1e-5;
  const int64_t total = N * C * S;
  std::vector<double> x = random_values(t, total, 2.0, 4.0), dy = random_values(t, total, 1, 0);
  std::vector<double> w = random_values(pt, C, 0.5, 1.0), b = random_values(pt, C, 0.5, 0.0);
  std::vector<double> y(total), dx(total), mean(C), var(C), sdy(C, 0.0), sdyx(C, 0.0);
  const double cnt = double(N * S);
  for (int64_t c = 0; c < C; ++c) {
    double m = 0, v = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) m += x[at(cl, C, S, n, c, s)];
    m = cnt > 0 ? m / cnt : 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) v += std::pow(x[at(cl, C, S, n, c, s)] - m, 2);
    v = cnt > 0 ? v / cnt : 0;
    mean[c] = m, var[c] = v;
    const double r = 1.0 / std::sqrt(v + eps);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = at(cl, C, S, n, c, s);
        const double xh = (x[i] - m) * r, z = xh * w[c] + b[c];
        y[i] = relu ? std::max(z, 0.0) : z;
        const double gg = (!relu || z > 0) ? dy[i] : 0.0;
        sdy[c] += gg;
        sdyx[c] += gg * xh;
      }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = at(cl, C, S, n, c, s);
        const double xh = (x[i] - m) * r, z = xh * w[c] + b[c];
        double gg = (!relu || z > 0) ? dy[i] : 0.0;
        if (training) gg -= sdy[c] / cnt + xh * sdyx[c] / cnt;
        dx[i] = w[c] * r * gg;
      }
  }
  Buf x_buf(t, total), dy_buf(t, total), y_buf(t, total), dx_buf(t, total);
  Buf w_buf(pt, C), b_buf(pt, C), mean_buf(kF32, C), var_buf(kF32, C), sdy_buf(kF32, C),
      sdyx_buf(kF32, C);
  x_buf.upload(x);
  dy_buf.upload(dy);
  w_buf.upload(w);
  b_buf.upload(b);
  BatchNormFwdArgs f;
  f.dtype = t.dtype;
  f.param_dtype = pt.dtype;
  f.x = x_buf.ptr;
  f.y = y_buf.ptr;
  f.weight = w_buf.ptr;
  f.bias = b_buf.ptr;
  f.mean = static_cast<float*>(mean_buf.ptr);
  f.var = static_cast<float*>(var_buf.ptr);
  f.N = N, f.C = C, f.S = S;
  f.channels_last = cl;
  f.eps = float(eps);
  f.relu = relu;
  BatchNormBwdArgs g;
  g.dtype = t.dtype;
  g.param_dtype = pt.dtype;
  g.dy = dy_buf.ptr;
  g.x = x_buf.ptr;
  g.weight = w_buf.ptr;
  g.bias = b_buf.ptr;
  g.mean = f.mean;
  g.var = f.var;
  g.dx = dx_buf.ptr;
  g.sum_dy = static_cast<float*>(sdy_buf.ptr);
  g.sum_dy_xhat = static_cast<float*>(sdyx_buf.ptr);
  g.N = N, g.C = C, g.S = S;
  g.channels_last = cl;
  g.eps = float(eps);
  g.relu = relu;
  g.training = training;
  Workspace wf(batch_norm_fwd_workspace_bytes(f)), wb(batch_norm_bwd_workspace_bytes(g));
  f.workspace = wf.ptr, f.workspace_bytes = wf.bytes;
  g.workspace = wb.ptr, g.workspace_bytes = wb.bytes;
  std::string msg;
  bool ok = true;
  std::vector<char> first_y, first_dx;
  for (int rep = 0; rep < 2; ++rep) {
    CUDA_OK(launch_batch_norm_fwd(f, nullptr));
    CUDA_OK(launch_batch_norm_bwd(g, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    if (rep == 0) {
      first_y = y_buf.raw(), first_dx = dx_buf.raw();
    } else if (first_y != y_buf.raw() || first_dx != dx_buf.raw()) {
      ok = false;
      msg += " not deterministic;";
    }
  }
  const double sum_tol = t.atol * std::sqrt(cnt + 1) * 4;
  ok &= close("mean", mean_buf.download(), mean, 1e-5, 1e-5, &msg);
  ok &= close("var", var_buf.download(), var, 1e-5, 1e-4, &msg);
  ok &= close("sum_dy", sdy_buf.download(), sdy, sum_tol, 1e-3, &msg);
  ok &= close("sum_dy_xhat", sdyx_buf.download(), sdyx, sum_tol, 1e-3, &msg);
  if (total > 0) {
    ok &= close("y", y_buf.download(), y, t.atol, t.rtol, &msg);
    ok &= close("dx", dx_buf.download(), dx, t.atol * 2, t.rtol * 2, &msg);
  }
  char name[160];
  std::snprintf(name, sizeof name, "batch_norm %s/%s N=%lld C=%lld S=%lld %s relu=%d training=%d",
                t.name, pt.name, (long long)N, (long long)C, (long long)S, cl ? "CL" : "CF",
                int(relu), int(training));
  report(name, ok, msg);
}


// ---- bandwidth (bench mode) ----------------------------------------------------------------------
// Ideal bytes: forward reads x and writes y; backward reads x and dy and writes dx (mean / rstd,
// w, b and the dW/dB partials are not counted). Median of 20 timed iterations after 5 warm-ups.
void bench_layer_norm(int64_t M, int64_t N, bool rms) {
  const HostType& t = kBF16;
  Buf x(t, M * N), y(t, M * N), dy(t, M * N), dx(t, M * N), w(t, N), b(t, N), dw(t, N), db(t, N);
  Buf mean(kF32, M), rstd(kF32, M);
  x.upload(random_values(t, M * N, 2.0, 1.0));
  dy.upload(random_values(t, M * N, 1.0, 0.0));
  w.upload(random_values(t, N, 0.5, 1.0));
  b.upload(random_values(t, N, 0.5, 0.0));
  LayerNormFwdArgs f;
  f.dtype = f.param_dtype = t.dtype;
  f.x = x.ptr, f.y = y.ptr, f.weight = w.ptr, f.bias = rms ? nullptr : b.ptr;
  f.mean = static_cast<float*>(mean.ptr), f.rstd = static_cast<float*>(rstd.ptr);
  f.M = M, f.N = N, f.x_row_stride = N, f.y_row_stride = N, f.is_rms = rms;
  LayerNormBwdArgs g;
  g.dtype = g.param_dtype = t.dtype;
  g.dy = dy.ptr, g.x = x.ptr, g.weight = w.ptr, g.mean = f.mean, g.rstd = f.rstd, g.dx = dx.ptr;
  g.dweight = dw.ptr, g.dbias = rms ? nullptr : db.ptr;
  g.M = M, g.N = N, g.x_row_stride = N, g.dy_row_stride = N, g.dx_row_stride = N, g.is_rms = rms;
  Workspace ws(layer_norm_bwd_workspace_bytes(g));
  g.workspace = ws.ptr, g.workspace_bytes = ws.bytes;
  auto time_ms = [&](const std::function<void()>& fn) {
    cudaEvent_t start, stop;
    CUDA_OK(cudaEventCreate(&start));
    CUDA_OK(cudaEventCreate(&stop));
    for (int i = 0; i < 5; ++i) fn();
    std::vector<float> ms;
    for (int i = 0; i < 20; ++i) {
      CUDA_OK(cudaEventRecord(start));
      fn();
      CUDA_OK(cudaEventRecord(stop));
      CUDA_OK(cudaEventSynchronize(stop));
      float v = 0;
      CUDA_OK(cudaEventElapsedTime(&v, start, stop));
      ms.push_back(v);
    }
    std::sort(ms.begin(), ms.end());
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return double(ms[ms.size() / 2]);
  };
  const double fwd = time_ms([&] { CUDA_OK(launch_layer_norm_fwd(f, nullptr)); });
  const double bwd = time_ms([&] { CUDA_OK(launch_layer_norm_bwd(g, nullptr)); });
  const double elems = double(M) * double(N) * double(t.size);
  std::printf("bench %s bf16 M=%lld N=%lld: fwd %.3f ms %.0f GB/s | bwd %.3f ms %.0f GB/s | "
              "fwd+bwd %.0f GB/s\n", rms ? "rms_norm" : "layer_norm", (long long)M, (long long)N,
              fwd, 2 * elems / fwd / 1e6, bwd, 3 * elems / bwd / 1e6,
              5 * elems / (fwd + bwd) / 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool quick = mode == "quick";
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs)%s\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, quick ? " quick" : "");
  if (mode == "bench") {
    for (int64_t n : {4096, 8192, 32768, 65536, 131072, 262144}) {
      const int64_t m = (int64_t(1) << 26) / n;  // 128 MiB of bf16 per tensor: well past L2
      bench_layer_norm(m, n, false);
      bench_layer_norm(m, n, true);
    }
    return 0;
  }
  const HostType* types[] = {&kF32, &kF16, &kBF16};

  // LayerNorm / RMSNorm: register path (warp / block), cluster path (> 32768 fwd, > 8192 bwd on
  // sm_90), fallback (odd N, misaligned, > 262144).
  const int64_t ns_quick[] = {1, 1000, 4096, 40000, 65536};
  const int64_t ns_full[] = {1, 7, 256, 1000, 1024, 4096, 5120, 8192, 8200, 16384, 32768,
                             40000, 65536, 65537, 131072, 262144, 300000};
  for (const HostType* t : types) {
    for (int64_t n : quick ? std::vector<int64_t>(std::begin(ns_quick), std::end(ns_quick))
                           : std::vector<int64_t>(std::begin(ns_full), std::end(ns_full))) {
      const int64_t m = n >= 65536 ? 3 : (quick ? 5 : 37);
      test_layer_norm(*t, *t, m, n, false, true, true, 0);
      test_layer_norm(*t, *t, m, n, true, true, false, 0);
      if (!quick || n == 4096) {
        test_layer_norm(*t, kF32, m, n, false, true, true, 0);   // fp32 parameters
        test_layer_norm(*t, *t, m, n, false, false, false, 0);  // no affine
        test_layer_norm(*t, *t, m, n, false, true, true, 1);    // misaligned -> fallback
      }
    }
    test_layer_norm(*t, *t, 0, 512, false, true, true, 0);  // empty batch: zero dW / dB
  }

  // Per-example mode: M = 48 rows (6 row slots of 8 on the register path): examples of 3 rows
  // (inside a slot or crossing one boundary), 12 (always crossing), 48 (spanning every slot);
  // warp / block register configurations, the cluster (8200, 40000 on sm_90) and fallback
  // (odd N, misaligned) paths.
  const int64_t pe_ns_quick[] = {256, 4096, 40000};
  const int64_t pe_ns_full[] = {7, 256, 1000, 4096, 8192, 8200, 40000};
  for (const HostType* t : types) {
    for (int64_t n : quick ? std::vector<int64_t>(std::begin(pe_ns_quick), std::end(pe_ns_quick))
                           : std::vector<int64_t>(std::begin(pe_ns_full), std::end(pe_ns_full))) {
      for (int64_t rpe : {3, 12, 48}) {
        test_layer_norm(*t, *t, 48, n, false, true, true, 0, rpe);
        if (!quick) test_layer_norm(*t, *t, 48, n, true, true, false, 0, rpe);
      }
      if (!quick) test_layer_norm(*t, kF32, 48, n, false, true, true, 1, 12);  // misaligned
    }
    test_layer_norm(*t, *t, 0, 512, false, true, true, 0, 4);  // empty batch
  }

  // GroupNorm: NCHW and channels-last, SiLU, splits (small N*C with large HW).
  for (const HostType* t : types) {
    for (bool cl : {false, true})
      for (bool act : {false, true}) {
        test_group_norm(*t, *t, 2, 64, 49, 32, cl, act, true);
        test_group_norm(*t, kF32, 3, 96, 64, 8, cl, act, true);
        if (!quick) {
          test_group_norm(*t, *t, 1, 32, 16384, 4, cl, act, true);
          test_group_norm(*t, *t, 2, 30, 17, 5, cl, act, false);
          test_group_norm(*t, *t, 0, 32, 16, 4, cl, act, true);
        }
      }
  }

  // BatchNorm: both layouts, ReLU, training and eval, (N, C) inputs (S = 1).
  for (const HostType* t : types) {
    for (bool cl : {false, true})
      for (bool relu : {false, true}) {
        test_batch_norm(*t, *t, 4, 16, 64, cl, relu, true);
        test_batch_norm(*t, kF32, 8, 3, 49, cl, relu, true);
        if (!quick) {
          test_batch_norm(*t, *t, 5, 7, 1, cl, relu, false);
          test_batch_norm(*t, *t, 2, 64, 4096, cl, relu, true);
          test_batch_norm(*t, *t, 0, 8, 16, cl, relu, true);
        }
      }
  }
  std::printf("%d cases, %d failed\n", g_cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}
