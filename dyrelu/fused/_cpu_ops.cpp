// The CPU kernels of _cpu_kernels.c as real PyTorch operators (namespace dyrelu_cpu), built by
// torch.utils.cpp_extension at first use (dyrelu/fused/_native.py). Each op takes the (N, C, L)
// view of an NC-contiguous float32 / float64 input; the callers check dtype, layout and K <= 3
// (_native.ok). Their fake (meta) implementations are registered from Python (_native.py).
//
//   forward(x, a, b?, pi?)                   y = max_k(a_k x + b_k) [* pi]
//   forward_(x!, a, b?, pi?)                 the same, written over x (inference, inplace)
//   backward(g, x, a, b?, pi?, need_pi)      (grad_x, sum_gx, sum_g, grad_pi or empty)
//   row_moments(x)                           per-(n, c) mean and biased variance
//   moments(x), moments_backward(x, mu, ...) the fused BN's statistics and their backward (ops.py);
//   moments_backward_(gx!, x, mu, ...)       the backward added into gx in place
//   site(x, w1, b1, w2, b2, offset, scale, k, width), site_(x!, ...)
//                                            a whole inference-mode DY-ReLU A / B in one call
//   spatial(x, w, bias)                      variant C's logits z (N, L)
//   spatial_backward(x, w, gz)               (grad_x, grad_w (C,))
//   bn_coefs(m, mu?, var, ...)               the fused BN's coefficient math: BN fold, the hyper
//                                            function, A = a s, B = a t + b, and the intermediates
//                                            its backward reuses (ops.py's _bn_coefs_math)
//   bn_coefs_backward(state, gA?, gB?, m, ...) its hand-written backward from the forward's state
//   site_coefs(x, mean?, var?, ...), site_coefs_backward(...)
//                                            a site's statistics, coefficients and C's logits, and
//                                            their backward (ops.py's dyrelu::bn_coefs)
//   bn_act(x, mean?, var?, ...)              a whole BN + DY-ReLU A / B training or inference site:
//                                            site_coefs, then forward (ops.py's bn_act)
//   bn_act_backward(g, x, A, B, m, ...)      its backward: backward, bn_coefs_backward, and the
//                                            statistics' gradient added into grad_x in place
//   isa_level(cap?)                          the instruction set in use (0 generic, 1 AVX2,
//                                            2 AVX-512), optionally capped: same results at each
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

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

// ops.py's dyrelu::moments on this path: (m (N, C), var (C,) biased over batch and space, mu (C,))
std::tuple<Tensor, Tensor, Tensor> moments(const Tensor& x) {
  auto [m, v] = row_moments(x);
  Tensor mu = m.mean(0);
  // law of total variance: within-row variance plus the variance of the row means (exact)
  Tensor var = v.mean(0) + (m - mu).square().mean(0);
  return {m.contiguous(), var, mu};
}

// gx += alpha_c x + beta_nc in place; alpha (C,), beta (N, C) in x's dtype
void affine_add_(Tensor& gx, const Tensor& x, const Tensor& alpha, const Tensor& beta) {
  int64_t n = x.size(0), c = x.size(1), l = x.size(2);
  if (x.scalar_type() == at::kDouble)
    KERNEL(affine_add, f64)(x.data_ptr<double>(), gx.data_ptr<double>(), alpha.data_ptr<double>(),
                            beta.data_ptr<double>(), n, c, l, threads());
  else
    KERNEL(affine_add, f32)(x.data_ptr<float>(), gx.data_ptr<float>(), alpha.data_ptr<float>(),
                            beta.data_ptr<float>(), n, c, l, threads());
}

// moments_backward's per-(n, c) affine map: grad_x = alpha_c x + beta_nc = g_m / L + g_var 2 (x - mu) / M;
// alpha (C,) and beta (N, C) contiguous in mu's dtype
std::tuple<Tensor, Tensor> moments_grad_affine(const Tensor& x, const Tensor& mu, const OptTensor& g_m,
                                               const OptTensor& g_var) {
  int64_t n = x.size(0), c = x.size(1), l = x.size(2);
  auto cdt = mu.scalar_type();
  Tensor alpha = g_var.has_value() ? g_var->to(cdt) * (2.0 / static_cast<double>(n * l)) : at::zeros({c}, mu.options());
  Tensor beta = -(alpha * mu);
  beta = g_m.has_value() ? g_m->to(cdt) / static_cast<double>(l) + beta : beta.expand({n, c});
  return {alpha.contiguous(), beta.contiguous()};
}

// grad_x += g_m / L + g_var 2 (x - mu) / M (ops.py's moments_backward) in place: one pass
Tensor& moments_backward_(Tensor& gx, const Tensor& x, const Tensor& mu, const OptTensor& g_m,
                          const OptTensor& g_var) {
  check3(x, "x");
  check_like(gx, x, "gx");
  TORCH_CHECK(gx.sizes() == x.sizes(), "dyrelu_cpu: gx must have x's shape");
  auto [alpha, beta] = moments_grad_affine(x, mu, g_m, g_var);
  affine_add_(gx, x, alpha, beta);
  return gx;
}

// ops.py's dyrelu::moments_backward on this path: grad_x = g_m / L + g_var 2 (x - mu) / M as one
// affine pass alpha_c x + beta_nc (the forward kernel with K = 1); mu in the statistics' dtype, x's
Tensor moments_backward(const Tensor& x, const Tensor& mu, const OptTensor& g_m, const OptTensor& g_var) {
  check3(x, "x");
  int64_t n = x.size(0), c = x.size(1);
  auto [alpha, beta] = moments_grad_affine(x, mu, g_m, g_var);
  return forward(x, alpha.expand({n, c}).reshape({n, 1, c}).contiguous(), beta.reshape({n, 1, c}), std::nullopt);
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


// ---------------------------------------------------------------------------------------------
// The fused BN + DY-ReLU's coefficient math on (N, C)-sized tensors. The same ATen ops, in the
// same order and with the same dtypes, as the Python of ops.py (_bn_fold, _hyper.hyper and
// hyper_backward, bn_coefs, bn_coefs_backward), so the results are bit-for-bit those of the Python
// (tests/test_native_build.py compares them); in C++ each op costs a fraction of a Python call,
// and a site runs dozens of them. Called by the CPU path without autocast.
// ---------------------------------------------------------------------------------------------

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Fold {
  Tensor mu, r, s, t, pooled;
};

Fold bn_fold(const Tensor& m_in, const OptTensor& mu_in, const Tensor& var, const OptTensor& weight,
             const OptTensor& bias, double eps) {
  auto cdt = compute_dtype(m_in.scalar_type());
  Tensor m = m_in.to(cdt);
  Tensor mu = mu_in.has_value() ? mu_in->to(cdt) : m.mean(0);
  Tensor r = at::rsqrt(var.to(cdt) + eps);
  Tensor s = weight.has_value() ? r * weight->to(cdt) : r;
  Tensor t = bias.has_value() ? at::addcmul(bias->to(cdt), mu, s, -1.0) : -mu * s;
  Tensor pooled = at::addcmul(t, m, s);
  return {mu, r, s, t, pooled};
}

// The forward's intermediates that the backward reuses (ops.py's _bn_state, in this order): r, t (C,);
// ph (N, C) the context in w1's dtype; h_pre, h (N, H); sig (N, 2|1 * m * W); a (N, K, W). None of them
// is an input (an operator's outputs may not alias its inputs): mu and s are recomputed from them.
enum { S_R, S_T, S_PH, S_HPRE, S_H, S_SIG, S_A, S_LEN };

// the state above, and b (N, K, width)
std::tuple<std::vector<Tensor>, Tensor> bn_state(const Tensor& m, const OptTensor& mu, const Tensor& var,
                                                 const OptTensor& weight, const OptTensor& bias, double eps,
                                                 const Tensor& w1, const Tensor& b1, const Tensor& w2,
                                                 const Tensor& b2, const Tensor& init_a, const Tensor& init_b,
                                                 const Tensor& lambda_a, const Tensor& lambda_b, int64_t segments,
                                                 int64_t width, bool use_bias) {
  Fold f = bn_fold(m, mu, var, weight, bias, eps);
  Tensor ph = f.pooled.to(w1.scalar_type());
  int64_t k = init_a.size(0);
  Tensor h_pre = at::linear(ph, w1, b1);
  Tensor h = at::relu(h_pre);
  Tensor logits = at::linear(h, w2, b2);
  auto dt = at::promote_types(logits.scalar_type(), at::kFloat);
  Tensor sig = at::sigmoid(logits.to(dt));
  Tensor theta = (sig * 2.0 - 1.0).unflatten(1, {use_bias ? 2 : 1, segments, width});
  Tensor da = theta.select(1, 0);
  OptTensor db;
  if (use_bias) db = theta.select(1, 1);
  if (segments < k) {
    da = at::constant_pad_nd(da, {0, 0, 0, k - segments}, 0);
    if (db.has_value()) db = at::constant_pad_nd(*db, {0, 0, 0, k - segments}, 0);
  }
  Tensor a = init_a.to(dt).reshape({1, k, 1}) + lambda_a.to(dt) * da;
  Tensor b_init = init_b.to(dt).reshape({1, k, 1});
  Tensor b = db.has_value() ? b_init + lambda_b.to(dt) * *db : b_init.expand_as(a);
  auto cdt = f.s.scalar_type();
  return {{f.r, f.t, ph, h_pre, h, sig, a.to(cdt)}, b.to(cdt)};
}

// s = r weight, as bn_fold computes it
Tensor scale_of(const std::vector<Tensor>& st, const OptTensor& weight) {
  const Tensor& r = st[S_R];
  return weight.has_value() ? r * weight->to(r.scalar_type()) : r;
}

// (A, B, state): A = a s, B = a t + b
std::tuple<Tensor, Tensor, std::vector<Tensor>> bn_coefs(
    const Tensor& m, const OptTensor& mu, const Tensor& var, const OptTensor& weight, const OptTensor& bias,
    double eps, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& init_a,
    const Tensor& init_b, const Tensor& lambda_a, const Tensor& lambda_b, int64_t segments, int64_t width,
    bool use_bias) {
  auto [st, b] = bn_state(m, mu, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b,
                          segments, width, use_bias);
  const Tensor& a = st[S_A];
  Tensor s = scale_of(st, weight);
  Tensor big_a = (a * s).contiguous();
  Tensor big_b = at::addcmul(b, a, st[S_T]).contiguous();
  return {big_a, big_b, st};
}

Tensor part(const OptTensor& g, const Tensor& lam, int64_t n, int64_t segments, int64_t width, at::ScalarType dt,
            const Tensor& like) {
  if (!g.has_value()) return at::zeros({n, segments, width}, like.options().dtype(dt));
  return g->slice(1, 0, segments).to(dt) * lam.to(dt);
}

// _hyper.hyper_backward_from: (grad p, w1, b1, w2, b2) given the forward's p, h_pre, h, sig
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> hyper_backward_from(
    const OptTensor& ga, const OptTensor& gb, const Tensor& p, const Tensor& h_pre, const Tensor& h,
    const Tensor& sig, const Tensor& w1, const Tensor& w2, const Tensor& lambda_a, const Tensor& lambda_b,
    int64_t segments, int64_t width, bool use_bias) {
  auto dt = sig.scalar_type();
  int64_t n = p.size(0);
  Tensor dtheta = use_bias ? at::stack({part(ga, lambda_a, n, segments, width, dt, p),
                                        part(gb, lambda_b, n, segments, width, dt, p)}, 1)
                           : part(ga, lambda_a, n, segments, width, dt, p).unsqueeze(1);
  Tensor dlogits = (dtheta.reshape({n, -1}) * (sig * 2.0 * at::rsub(sig, 1.0))).to(w2.scalar_type());
  Tensor gw2 = at::matmul(dlogits.t(), h);
  Tensor gb2 = dlogits.sum(0);
  Tensor dh = at::matmul(dlogits, w2).masked_fill_(h_pre.le(0), 0.0);
  Tensor gw1 = at::matmul(dh.t(), p);
  Tensor gb1 = dh.sum(0);
  return {at::matmul(dh, w1), gw1, gb1, gw2, gb2};
}

using CoefGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ops.py's _bn_coefs_backward: (grad m, var, weight, bias, w1, b1, w2, b2) given the forward's state;
// mu_in: the mean the forward normalised with, if given (else the batch's, m.mean(0))
CoefGrads bn_coefs_backward(const std::vector<Tensor>& st, const OptTensor& g_big_a_in, const OptTensor& g_big_b_in,
                            const Tensor& m, const OptTensor& mu_in, const Tensor& var, const OptTensor& weight,
                            const OptTensor& bias, const Tensor& w1, const Tensor& w2, const Tensor& lambda_a,
                            const Tensor& lambda_b, const OptTensor& gs_extra, const OptTensor& gt_extra,
                            int64_t segments, int64_t width, bool use_bias) {
  TORCH_CHECK(st.size() == S_LEN, "dyrelu_cpu: the saved state holds ", S_LEN, " tensors, got ", st.size());
  const Tensor &r = st[S_R], &t = st[S_T], &a = st[S_A];
  auto cdt = r.scalar_type();
  int64_t n = m.size(0), c = m.size(1);
  Tensor mc = m.to(cdt);
  Tensor mu = mu_in.has_value() ? mu_in->to(cdt) : mc.mean(0);  // as bn_fold computes them
  Tensor s = scale_of(st, weight);
  int64_t k = a.size(1);
  auto opts = m.options().dtype(cdt);
  Tensor g_big_a = g_big_a_in.has_value() ? g_big_a_in->to(cdt) : at::zeros({n, k, c}, opts);
  Tensor g_big_b = g_big_b_in.has_value() ? g_big_b_in->to(cdt) : at::zeros({n, k, c}, opts);
  // A = a s, B = b + a t  (a broadcast over C for variant A)
  Tensor ga = g_big_a * s + g_big_b * t;
  Tensor gb = g_big_b;
  if (a.size(2) != ga.size(2)) {
    ga = ga.sum(2, true);
    gb = gb.sum(2, true);
  }
  Tensor gs = (g_big_a * a).sum({0, 1});
  Tensor gt = (g_big_b * a).sum({0, 1});
  if (gs_extra.has_value()) gs = gs + *gs_extra;
  if (gt_extra.has_value()) gt = gt + *gt_extra;
  // no-op conversions but where autocast ran the forward's FCs (the backward runs without it)
  Tensor ph = st[S_PH].to(w1.scalar_type()), h = st[S_H].to(w2.scalar_type());
  auto [gp, gw1, gb1, gw2, gb2] = hyper_backward_from(ga, gb, ph, st[S_HPRE], h, st[S_SIG], w1, w2, lambda_a,
                                                      lambda_b, segments, width, use_bias);
  gp = gp.to(cdt);
  // pooled = m s + t
  Tensor gm = gp * s;
  gs = gs + (gp * mc).sum(0);
  gt = gt + gp.sum(0);
  // t = bias - mu s
  gs = gs - gt * mu;
  if (!mu_in.has_value()) gm = gm - (gt * s) / static_cast<double>(n);  // mu = mean over n of m
  // s = r weight, r = (var + eps)^-1/2
  Tensor gr = weight.has_value() ? gs * weight->to(cdt) : gs;
  Tensor gvar = gr * (-0.5) * r * r * r;
  Tensor g_weight = weight.has_value() ? (gs * r).to(weight->scalar_type()) : m.new_empty({0});
  Tensor g_bias = bias.has_value() ? gt.to(bias->scalar_type()) : m.new_empty({0});
  return {gm.to(m.scalar_type()).contiguous(), gvar.to(var.scalar_type()).contiguous(), g_weight, g_bias,
          gw1.contiguous(), gb1.contiguous(), gw2.contiguous(), gb2.contiguous()};
}

// ---------------------------------------------------------------------------------------------
// A whole BN + DY-ReLU site (ops.py's dyrelu::bn_coefs and dyrelu::bn_act, and their backward): the
// functions above in the order ops.py's Python composes them, so the same bits, in one call per
// direction instead of a dozen Python-level steps.
// ---------------------------------------------------------------------------------------------

using SiteCoefs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>>;

// (A, B, z (N, L) or empty, m, batch mu, batch var, state); mean / var given: normalise with them
// (running statistics) and return empty batch statistics; spatial_w given: variant C's logits on
// the BN output s x + t (the 1x1 conv folded: weights w s, bias sum(w t))
SiteCoefs site_coefs(const Tensor& x, const OptTensor& mean, const OptTensor& var, const OptTensor& weight,
                     const OptTensor& bias, double eps, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                     const Tensor& b2, const Tensor& init_a, const Tensor& init_b, const Tensor& lambda_a,
                     const Tensor& lambda_b, const OptTensor& spatial_w, int64_t segments, int64_t width,
                     bool use_bias) {
  check3(x, "x");
  TORCH_CHECK(mean.has_value() == var.has_value(), "dyrelu_cpu: a site takes both mean and var, or neither");
  Tensor m, var_used, batch_mu, batch_var;
  if (mean.has_value()) {
    m = x.mean(2);
    var_used = *var;
    batch_mu = x.new_empty({0});
    batch_var = x.new_empty({0});
  } else {
    std::tie(m, batch_var, batch_mu) = moments(x);
    var_used = batch_var;
  }
  auto [big_a, big_b, st] = bn_coefs(m, mean, var_used, weight, bias, eps, w1, b1, w2, b2, init_a, init_b,
                                     lambda_a, lambda_b, segments, width, use_bias);
  Tensor z = x.new_empty({0});
  if (spatial_w.has_value()) {
    auto cdt = x.scalar_type();
    Tensor wv = spatial_w->reshape(-1).to(cdt);
    Tensor ws = wv * scale_of(st, weight).to(cdt);
    Tensor zb = (wv * st[S_T].to(cdt)).sum().reshape(1);
    z = spatial(x, ws.contiguous(), zb.contiguous());
  }
  return {big_a, big_b, z, m, batch_mu, batch_var, st};
}

// The rest of a site's backward once grad A, grad B (and C's gz (N, L)) are known: the spatial conv's
// gradient of x (into gx, or a fresh one), the coefficient backward, the statistics' gradient added in
// place. Returns (gx, grad weight, bias, w1, b1, w2, b2, grad spatial_w or empty).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> site_backward(
    OptTensor gx, const OptTensor& g_big_a, const OptTensor& g_big_b, const OptTensor& gz, const Tensor& x,
    const Tensor& m, const Tensor& mu, const Tensor& var, bool batch, const OptTensor& weight,
    const OptTensor& bias, const Tensor& w1, const Tensor& w2, const Tensor& lambda_a, const Tensor& lambda_b,
    const OptTensor& spatial_w, const std::vector<Tensor>& state, int64_t segments, int64_t width, bool use_bias) {
  OptTensor gs_z, gt_z;
  Tensor g_sw = x.new_empty({0});
  if (gz.has_value() && spatial_w.has_value()) {  // z = sum_c ws_c x_c + sum_c w_c t_c, ws = w s
    Tensor s = scale_of(state, weight);
    const Tensor& t = state[S_T];
    auto cdt = s.scalar_type();
    Tensor wv = spatial_w->reshape(-1).to(cdt);
    Tensor ws = wv * s.to(cdt);
    Tensor gz2 = gz->reshape({x.size(0), -1}).to(cdt).contiguous();
    auto [gx_z, g_ws] = spatial_backward(x, ws.contiguous(), gz2);
    Tensor g_zb = gz2.sum();
    gx = gx.has_value() ? gx->add_(gx_z) : gx_z;
    gs_z = g_ws * wv;
    gt_z = g_zb * wv;
    g_sw = (g_ws * s + g_zb * t).to(spatial_w->scalar_type()).reshape(spatial_w->sizes());
  }
  auto [gm, gvar, g_weight, g_bias, gw1, gb1, gw2, gb2] =
      bn_coefs_backward(state, g_big_a, g_big_b, m, batch ? OptTensor() : OptTensor(mu), var, weight, bias, w1, w2,
                        lambda_a, lambda_b, gs_z, gt_z, segments, width, use_bias);
  if (!gx.has_value()) gx = at::zeros_like(x);
  if (batch)
    moments_backward_(*gx, x, mu, gm, gvar);
  else  // m = the pool of x: grad m / L on every position
    gx->add_((gm / static_cast<double>(x.size(2))).unsqueeze(2));
  return {*gx, g_weight, g_bias, gw1, gb1, gw2, gb2, g_sw};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> site_coefs_backward(
    const OptTensor& g_big_a, const OptTensor& g_big_b, const OptTensor& gz, const Tensor& x, const Tensor& m,
    const Tensor& mu, const Tensor& var, bool batch, const OptTensor& weight, const OptTensor& bias,
    const Tensor& w1, const Tensor& w2, const Tensor& lambda_a, const Tensor& lambda_b, const OptTensor& spatial_w,
    const std::vector<Tensor>& state, int64_t segments, int64_t width, bool use_bias) {
  check3(x, "x");
  return site_backward(std::nullopt, g_big_a, g_big_b, gz, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a,
                       lambda_b, spatial_w, state, segments, width, use_bias);
}

// variants A and B: site_coefs, then the apply: (y, A, B, m, batch mu, batch var, state)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>> bn_act(
    const Tensor& x, const OptTensor& mean, const OptTensor& var, const OptTensor& weight, const OptTensor& bias,
    double eps, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& init_a,
    const Tensor& init_b, const Tensor& lambda_a, const Tensor& lambda_b, int64_t segments, int64_t width,
    bool use_bias) {
  auto [big_a, big_b, z, m, batch_mu, batch_var, st] =
      site_coefs(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, std::nullopt,
                 segments, width, use_bias);
  Tensor y = forward(x, big_a, big_b, std::nullopt);
  return {y, big_a, big_b, m, batch_mu, batch_var, st};
}

// mu, var: the statistics the forward normalised with; batch: they were the batch's (then mu is
// differentiated through m, and var's gradient flows back to x), else the running ones
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_act_backward(
    const Tensor& g, const Tensor& x, const Tensor& big_a, const Tensor& big_b, const Tensor& m, const Tensor& mu,
    const Tensor& var, bool batch, const OptTensor& weight, const OptTensor& bias, const Tensor& w1,
    const Tensor& w2, const Tensor& lambda_a, const Tensor& lambda_b, const std::vector<Tensor>& state,
    int64_t segments, int64_t width, bool use_bias) {
  auto [gx, s_gx, s_g, unused] = backward(g, x, big_a, big_b, std::nullopt, false);
  auto [gx_all, g_weight, g_bias, gw1, gb1, gw2, gb2, g_sw] =
      site_backward(gx, s_gx, s_g, std::nullopt, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b,
                    std::nullopt, state, segments, width, use_bias);
  return {gx_all, g_weight, g_bias, gw1, gb1, gw2, gb2};
}

}  // namespace

TORCH_LIBRARY(dyrelu_cpu, m) {
  m.def("forward(Tensor x, Tensor a, Tensor? b, Tensor? pi) -> Tensor");
  m.def("forward_(Tensor(a!) x, Tensor a, Tensor? b, Tensor? pi) -> Tensor(a!)");
  m.def("backward(Tensor g, Tensor x, Tensor a, Tensor? b, Tensor? pi, bool need_pi) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("row_moments(Tensor x) -> (Tensor, Tensor)");
  m.def("moments(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("moments_backward(Tensor x, Tensor mu, Tensor? g_m, Tensor? g_var) -> Tensor");
  m.def("moments_backward_(Tensor(a!) gx, Tensor x, Tensor mu, Tensor? g_m, Tensor? g_var) -> Tensor(a!)");
  m.def("site(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor offset, Tensor scale, int k, int width) -> Tensor");
  m.def("site_(Tensor(a!) x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor offset, Tensor scale, int k, int width) -> Tensor(a!)");
  m.def("spatial(Tensor x, Tensor w, Tensor bias) -> Tensor");
  m.def("spatial_backward(Tensor x, Tensor w, Tensor gz) -> (Tensor, Tensor)");
  m.def("bn_coefs(Tensor m, Tensor? mu, Tensor var, Tensor? weight, Tensor? bias, float eps, Tensor w1, Tensor b1, "
        "Tensor w2, Tensor b2, Tensor init_a, Tensor init_b, Tensor lambda_a, Tensor lambda_b, int segments, "
        "int width, bool use_bias) -> (Tensor, Tensor, Tensor[])");
  m.def("bn_coefs_backward(Tensor[] state, Tensor? g_big_a, Tensor? g_big_b, Tensor m, Tensor? mu, Tensor var, "
        "Tensor? weight, Tensor? bias, Tensor w1, Tensor w2, Tensor lambda_a, Tensor lambda_b, Tensor? gs_extra, "
        "Tensor? gt_extra, int segments, int width, bool use_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
  m.def("site_coefs(Tensor x, Tensor? mean, Tensor? var, Tensor? weight, Tensor? bias, float eps, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2, Tensor init_a, Tensor init_b, Tensor lambda_a, Tensor lambda_b, "
        "Tensor? spatial_w, int segments, int width, bool use_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor[])");
  m.def("site_coefs_backward(Tensor? g_big_a, Tensor? g_big_b, Tensor? gz, Tensor x, Tensor m, Tensor mu, "
        "Tensor var, bool batch, Tensor? weight, Tensor? bias, Tensor w1, Tensor w2, Tensor lambda_a, "
        "Tensor lambda_b, Tensor? spatial_w, Tensor[] state, int segments, int width, bool use_bias) -> (Tensor, "
        "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_act(Tensor x, Tensor? mean, Tensor? var, Tensor? weight, Tensor? bias, float eps, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2, Tensor init_a, Tensor init_b, Tensor lambda_a, Tensor lambda_b, "
        "int segments, int width, bool use_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[])");
  m.def("bn_act_backward(Tensor g, Tensor x, Tensor big_a, Tensor big_b, Tensor m, Tensor mu, Tensor var, "
        "bool batch, Tensor? weight, Tensor? bias, Tensor w1, Tensor w2, Tensor lambda_a, Tensor lambda_b, "
        "Tensor[] state, int segments, int width, bool use_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
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
  m.impl("moments", &moments);
  m.impl("moments_backward", &moments_backward);
  m.impl("moments_backward_", &moments_backward_);
  m.impl("site", &site);
  m.impl("site_", &site_);
  m.impl("spatial", &spatial);
  m.impl("spatial_backward", &spatial_backward);
  m.impl("bn_coefs", &bn_coefs);
  m.impl("bn_coefs_backward", &bn_coefs_backward);
  m.impl("site_coefs", &site_coefs);
  m.impl("site_coefs_backward", &site_coefs_backward);
  m.impl("bn_act", &bn_act);
  m.impl("bn_act_backward", &bn_act_backward);
}
