// The CPU kernels of _cpu_kernels.c as real PyTorch operators (namespace dyrelu_cpu), built by
// torch.utils.cpp_extension at first use (dyrelu/fused/_native.py). Each op takes the (N, C, L)
// view of an NC-contiguous float32 / float64 input; the callers check dtype, layout and K <= 3
// (_native.ok). Their fake (meta) implementations are registered from Python (_native.py).
//
//   forward(x, a, b?, pi?)                   y = max_k(a_k x + b_k) [* pi]
//   forward_(x!, a, b?, pi?)                 the same, written over x (inference, inplace)
//   backward(g, x, a, b?, pi?, need_pi)      (grad_x, sum_gx, sum_g, grad_pi or empty)
//   row_moments(x)                           per-(n, c) mean and biased variance
//   site(x, w1, b1, w2, b2, offset, scale, k, width), site_(x!, ...)
//                                            a whole inference-mode DY-ReLU A / B in one call
//   spatial(x, w, bias)                      variant C's logits z (N, L)
//   spatial_backward(x, w, gz)               (grad_x, grad_w (C,))
//   isa_level(cap?)                          the instruction set in use (0 generic, 1 AVX2,
//                                            2 AVX-512), optionally capped: same results at each
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <tuple>

#define restrict __restrict__
#include "_cpu_kernels.c"
#undef restrict

namespace {

// The instruction set the kernels run with: 0 the build's generic target, 1 AVX2 (x86-64-v3),
// 2 AVX-512 (x86-64-v4); the best this CPU has, capped by isa_level(cap). The results are the
// same at every level (_cpu_kernels.c, LANES); only the speed differs.
int detect_isa() {
#ifdef DYRELU_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return 1;
#endif
  return 0;
}

std::atomic<int64_t> isa_cap{2};

int64_t isa() {
  static const int64_t hw = detect_isa();
  return std::min(hw, isa_cap.load(std::memory_order_relaxed));
}

#ifdef DYRELU_X86_ISAS
#define KERNEL(name, suf) (isa() == 2 ? name##_##suf##_avx512 : isa() == 1 ? name##_##suf##_avx2 : name##_##suf)
#else
#define KERNEL(name, suf) name##_##suf
#endif

// cap >= 0 caps the level (tests compare the levels; 0 runs the generic build); returns the level in use
int64_t isa_level(std::optional<int64_t> cap) {
  if (cap) {
    TORCH_CHECK(*cap >= 0 && *cap <= 2, "dyrelu_cpu: isa_level cap must be 0, 1 or 2, got ", *cap);
    isa_cap.store(*cap, std::memory_order_relaxed);
  }
  return isa();
}

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int64_t threads() { return at::get_num_threads(); }

// Position chunks per sample for the (sample, chunk) kernels: enough tasks for every thread, at
// least 512 positions per chunk.
int64_t chunks_for(int64_t n, int64_t length) {
  int64_t by_len = (length + 511) / 512;
  int64_t by_threads = (2 * threads() + n - 1) / n;
  return std::max<int64_t>(1, std::min(by_len, by_threads));
}

void check3(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(),
              "dyrelu_cpu: ", name, " takes a contiguous (N, C, L) CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dyrelu_cpu: ", name, " takes float32 or float64, got ", x.scalar_type());
}

void check_like(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == x.scalar_type() && t.device().is_cpu(),
              "dyrelu_cpu: ", name, " must be a contiguous CPU tensor in x's dtype");
}

void check_coefs(const Tensor& x, const Tensor& a, const OptTensor& b, const OptTensor& pi) {
  check_like(a, x, "a");
  TORCH_CHECK(a.dim() == 3 && a.size(0) == x.size(0) && a.size(1) >= 1 && a.size(1) <= 3 &&
                  (a.size(2) == 1 || a.size(2) == x.size(1)),
              "dyrelu_cpu: a must be (N, K <= 3, C or 1)");
  if (b) {
    check_like(*b, x, "b");
    TORCH_CHECK(b->sizes() == a.sizes(), "dyrelu_cpu: b must have a's shape");
  }
  if (pi) {
    check_like(*pi, x, "pi");
    TORCH_CHECK(pi->numel() == x.size(0) * x.size(2), "dyrelu_cpu: pi must hold N * L values");
  }
}

template <typename T>
const T* ptr(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

void run_forward(const Tensor& x, const Tensor& y, const Tensor& a, const OptTensor& b, const OptTensor& pi) {
  int64_t n = x.size(0), c = x.size(1), l = x.size(2), k = a.size(1), w = a.size(2);
  if (x.scalar_type() == at::kFloat)
    KERNEL(dyrelu_fwd, f32)(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<float>(), ptr<float>(b),
                   ptr<float>(pi), n, c, l, k, w, threads());
  else
    KERNEL(dyrelu_fwd, f64)(x.data_ptr<double>(), y.data_ptr<double>(), a.data_ptr<double>(), ptr<double>(b),
                   ptr<double>(pi), n, c, l, k, w, threads());
}

Tensor forward(const Tensor& x, const Tensor& a, const OptTensor& b, const OptTensor& pi) {
  check3(x, "x");
  check_coefs(x, a, b, pi);
  Tensor y = at::empty_like(x);
  run_forward(x, y, a, b, pi);
  return y;
}

Tensor& forward_(Tensor& x, const Tensor& a, const OptTensor& b, const OptTensor& pi) {
  check3(x, "x");
  check_coefs(x, a, b, pi);
  run_forward(x, x, a, b, pi);  // each y[l] depends on x[l] alone
  return x;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& g, const Tensor& x, const Tensor& a,
                                                    const OptTensor& b, const OptTensor& pi, bool need_pi) {
  check3(x, "x");
  check_like(g, x, "g");
  TORCH_CHECK(g.sizes() == x.sizes(), "dyrelu_cpu: g must have x's shape");
  check_coefs(x, a, b, pi);
  int64_t n = x.size(0), c = x.size(1), l = x.size(2), k = a.size(1), w = a.size(2);
  bool dbl = x.scalar_type() == at::kDouble;
  Tensor gx = at::empty_like(x);
  if (!pi) {
    Tensor s_gx = x.new_empty({n, k, c}), s_g = x.new_empty({n, k, c});
    if (dbl)
      KERNEL(dyrelu_bwd, f64)(g.data_ptr<double>(), x.data_ptr<double>(), gx.data_ptr<double>(), a.data_ptr<double>(),
                     ptr<double>(b), s_gx.data_ptr<double>(), s_g.data_ptr<double>(), n, c, l, k, w, threads());
    else
      KERNEL(dyrelu_bwd, f32)(g.data_ptr<float>(), x.data_ptr<float>(), gx.data_ptr<float>(), a.data_ptr<float>(),
                     ptr<float>(b), s_gx.data_ptr<float>(), s_g.data_ptr<float>(), n, c, l, k, w, threads());
    return {gx, s_gx, s_g, x.new_empty({0})};
  }
  int64_t chunks = chunks_for(n, l);
  Tensor part_gx = x.new_empty({chunks, n, k, c}), part_g = x.new_empty({chunks, n, k, c});
  Tensor grad_pi = x.new_empty({n, 1, l});
  if (dbl)
    KERNEL(dyrelu_bwd_pi, f64)(g.data_ptr<double>(), x.data_ptr<double>(), gx.data_ptr<double>(), a.data_ptr<double>(),
                      ptr<double>(b), pi->data_ptr<double>(), grad_pi.data_ptr<double>(),
                      part_gx.data_ptr<double>(), part_g.data_ptr<double>(), n, c, l, k, w, chunks, threads());
  else
    KERNEL(dyrelu_bwd_pi, f32)(g.data_ptr<float>(), x.data_ptr<float>(), gx.data_ptr<float>(), a.data_ptr<float>(),
                      ptr<float>(b), pi->data_ptr<float>(), grad_pi.data_ptr<float>(), part_gx.data_ptr<float>(),
                      part_g.data_ptr<float>(), n, c, l, k, w, chunks, threads());
  Tensor s_gx = chunks == 1 ? part_gx[0] : part_gx.sum(0);
  Tensor s_g = chunks == 1 ? part_g[0] : part_g.sum(0);
  return {gx, s_gx, s_g, need_pi ? grad_pi : x.new_empty({0})};
}

std::tuple<Tensor, Tensor> row_moments(const Tensor& x) {
  check3(x, "x");
  int64_t n = x.size(0), c = x.size(1), l = x.size(2);
  Tensor m = x.new_empty({n, c}), v = x.new_empty({n, c});
  if (x.scalar_type() == at::kDouble)
    KERNEL(row_moments, f64)(x.data_ptr<double>(), m.data_ptr<double>(), v.data_ptr<double>(), n * c, l, threads());
  else
    KERNEL(row_moments, f32)(x.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), n * c, l, threads());
  return {m, v};
}

void run_site(const Tensor& x, const Tensor& y, const Tensor& w1, const Tensor& b1, const Tensor& w2,
              const Tensor& b2, const Tensor& offset, const Tensor& scale, int64_t k, int64_t width) {
  check3(x, "x");
  for (const Tensor* t : {&w1, &b1, &w2, &b2, &offset, &scale}) check_like(*t, x, "a hyper-function tensor");
  int64_t n = x.size(0), c = x.size(1), l = x.size(2), h = w1.size(0);
  TORCH_CHECK(k >= 1 && k <= 3 && (width == 1 || width == c), "dyrelu_cpu: site takes K <= 3, width 1 or C");
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == c && b1.numel() == h && w2.dim() == 2 && w2.size(1) == h &&
                  w2.size(0) == 2 * k * width && b2.numel() == w2.size(0) && offset.numel() == w2.size(0) &&
                  scale.numel() == w2.size(0),
              "dyrelu_cpu: site's hyper-function shapes do not match x");
  int rc = x.scalar_type() == at::kDouble
               ? KERNEL(dyrelu_site, f64)(x.data_ptr<double>(), y.data_ptr<double>(), w1.data_ptr<double>(),
                                 b1.data_ptr<double>(), w2.data_ptr<double>(), b2.data_ptr<double>(),
                                 offset.data_ptr<double>(), scale.data_ptr<double>(), n, c, l, h, k, width,
                                 threads())
               : KERNEL(dyrelu_site, f32)(x.data_ptr<float>(), y.data_ptr<float>(), w1.data_ptr<float>(),
                                 b1.data_ptr<float>(), w2.data_ptr<float>(), b2.data_ptr<float>(),
                                 offset.data_ptr<float>(), scale.data_ptr<float>(), n, c, l, h, k, width, threads());
  TORCH_CHECK(rc == 0, "dyrelu_cpu: site kernel out of memory for its scratch buffers");
}

Tensor site(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
            const Tensor& offset, const Tensor& scale, int64_t k, int64_t width) {
  Tensor y = at::empty_like(x);
  run_site(x, y, w1, b1, w2, b2, offset, scale, k, width);
  return y;
}

Tensor& site_(Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
              const Tensor& offset, const Tensor& scale, int64_t k, int64_t width) {
  run_site(x, x, w1, b1, w2, b2, offset, scale, k, width);  // pooling finishes before any write
  return x;
}

Tensor spatial(const Tensor& x, const Tensor& w, const Tensor& bias) {
  check3(x, "x");
  check_like(w, x, "w");
  check_like(bias, x, "bias");
  TORCH_CHECK(w.numel() == x.size(1) && bias.numel() == 1, "dyrelu_cpu: spatial takes w (C,) and bias (1,)");
  int64_t n = x.size(0), c = x.size(1), l = x.size(2);
  Tensor z = x.new_empty({n, l});
  if (x.scalar_type() == at::kDouble)
    KERNEL(spatial_fwd, f64)(x.data_ptr<double>(), w.data_ptr<double>(), bias.data_ptr<double>(), z.data_ptr<double>(), n,
                    c, l, chunks_for(n, l), threads());
  else
    KERNEL(spatial_fwd, f32)(x.data_ptr<float>(), w.data_ptr<float>(), bias.data_ptr<float>(), z.data_ptr<float>(), n, c,
                    l, chunks_for(n, l), threads());
  return z;
}

std::tuple<Tensor, Tensor> spatial_backward(const Tensor& x, const Tensor& w, const Tensor& gz) {
  check3(x, "x");
  check_like(w, x, "w");
  check_like(gz, x, "gz");
  int64_t n = x.size(0), c = x.size(1), l = x.size(2);
  TORCH_CHECK(w.numel() == c && gz.numel() == n * l, "dyrelu_cpu: spatial_backward takes w (C,) and gz (N, L)");
  Tensor gx = at::empty_like(x), part = x.new_empty({n, c});
  if (x.scalar_type() == at::kDouble)
    KERNEL(spatial_bwd, f64)(x.data_ptr<double>(), w.data_ptr<double>(), gz.data_ptr<double>(), gx.data_ptr<double>(),
                    part.data_ptr<double>(), n, c, l, threads());
  else
    KERNEL(spatial_bwd, f32)(x.data_ptr<float>(), w.data_ptr<float>(), gz.data_ptr<float>(), gx.data_ptr<float>(),
                    part.data_ptr<float>(), n, c, l, threads());
  return {gx, part.sum(0)};
}

}  // namespace

TORCH_LIBRARY(dyrelu_cpu, m) {
  m.def("forward(Tensor x, Tensor a, Tensor? b, Tensor? pi) -> Tensor");
  m.def("forward_(Tensor(a!) x, Tensor a, Tensor? b, Tensor? pi) -> Tensor(a!)");
  m.def("backward(Tensor g, Tensor x, Tensor a, Tensor? b, Tensor? pi, bool need_pi) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("row_moments(Tensor x) -> (Tensor, Tensor)");
  m.def("site(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor offset, Tensor scale, int k, int width) -> Tensor");
  m.def("site_(Tensor(a!) x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor offset, Tensor scale, int k, int width) -> Tensor(a!)");
  m.def("spatial(Tensor x, Tensor w, Tensor bias) -> Tensor");
  m.def("spatial_backward(Tensor x, Tensor w, Tensor gz) -> (Tensor, Tensor)");
  m.def("isa_level(int? cap=None) -> int");
}

TORCH_LIBRARY_IMPL(dyrelu_cpu, CompositeExplicitAutograd, m) {
  m.impl("isa_level", &isa_level);
}

TORCH_LIBRARY_IMPL(dyrelu_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("forward_", &forward_);
  m.impl("backward", &backward);
  m.impl("row_moments", &row_moments);
  m.impl("site", &site);
  m.impl("site_", &site_);
  m.impl("spatial", &spatial);
  m.impl("spatial_backward", &spatial_backward);
}
