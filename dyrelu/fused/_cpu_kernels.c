/* One-pass CPU kernels of the fused DY-ReLU apply and of the fused BatchNorm statistics.
 *
 * Compiled (as C++) inside _cpu_ops.cpp, which registers them as torch operators dyrelu_cpu::*,
 * built at first use by dyrelu/fused/_native.py; run on the (N, C, L) view of an NCHW-contiguous
 * input, row r = n * C + c. OpenMP here is the one torch already loaded (same soname), so these
 * kernels share torch's thread pool.
 *
 *   fwd        y = max_k(a_k x + b_k) [* pi]                       one read of x, one write of y
 *   bwd        grad_x = g a_sel [pi]; per-(n, k, c) sums of g x and g over the positions where
 *              segment k wins (ties: lowest k); for variant C also grad_pi = sum_c g max_k(..)
 *                                                                  one read of g and x, one write
 *   moments    per-row mean and biased variance                    one read of x (row in cache)
 *   affine_add gx += alpha_c x + beta_nc in place: the BN statistics' gradient added into the
 *              apply's grad_x (rounded as the forward kernel with K = 1 and a separate add)
 *   spatial    variant C's logits z = sum_c w_c x + bias (one read of x) and their backward
 *              grad_x = w_c g_z, grad_w_c = sum g_z x (one read of x, one write)
 *   site       a whole inference-mode DY-ReLU (A or B, intercepts, every segment dynamic): pool,
 *              FC1, ReLU, FC2, a = c0 + c1 sigmoid(l), then fwd; one call instead of ten ATen ops
 *
 * Coefficients a, b are (N, K, W) contiguous, W = C (variants B, C) or 1 (A); b may be NULL (no
 * intercept); pi is (N, L). K is 1, 2 or 3 (the caller uses other kernels otherwise). Each segment
 * is rounded as the reference rounds it (x * a, then + b; built with -ffp-contract=off), so the
 * special cases stay bit-exact. Row sums accumulate in blocks of T and are carried in double.
 *
 * The file includes itself once per element type (float, double).
 */
#ifndef DYRELU_KERNEL_BODY
#define DYRELU_KERNEL_BODY

#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
/* below this many elements a kernel runs on the calling thread: a parallel region costs more */
#define PARALLEL_MIN 32768
/* rows shorter than this take a plain scalar loop */
#define SHORT_ROW 16
/* Every vector sum keeps LANES partial sums, element l going to lane l % LANES, added up in one
 * fixed order at the end. The compiler may not reorder floating-point additions, so the result is
 * the same bit for bit whatever the vector width the code runs with (SSE2, AVX2, AVX-512): the
 * per-ISA builds below compute the same numbers, and so does every x86-64 CPU. */
#define LANES 8

/* One body per element type and instruction set: the generic target of the build flags, and on
 * x86-64 also AVX2 (x86-64-v3) and AVX-512 (x86-64-v4) builds that _cpu_ops.cpp picks at run
 * time. Only speed differs between them (see LANES; FMA contraction is off for all). */
#define T float
#define SUF f32
#include __FILE__
#undef T
#undef SUF

#define T double
#define SUF f64
#include __FILE__
#undef T
#undef SUF

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DYRELU_X86_ISAS 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define T float
#define SUF f32_avx2
#include __FILE__
#undef T
#undef SUF
#define T double
#define SUF f64_avx2
#include __FILE__
#undef T
#undef SUF
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define T float
#define SUF f32_avx512
#include __FILE__
#undef T
#undef SUF
#define T double
#define SUF f64_avx512
#include __FILE__
#undef T
#undef SUF
#pragma GCC pop_options
#endif

#else /* ------------------------------------------------------------------ body, once per T */

static inline __attribute__((always_inline)) void CAT(load_coef, SUF)(
    const T *a, const T *b, int64_t n, int64_t c, int64_t K, int64_t W, T *ak, T *bk) {
  int64_t wc = W == 1 ? 0 : c;
  for (int64_t k = 0; k < K; ++k) {
    ak[k] = a[(n * K + k) * W + wc];
    bk[k] = b ? b[(n * K + k) * W + wc] : (T)0;
  }
}

/* y[0:L) = max_k(ak x + bk) (* p) for one row; KK is a compile-time constant after inlining.
 * y may be x (in place): each y[l] depends on x[l] alone. */
static inline __attribute__((always_inline)) void CAT(fwd_row, SUF)(
    const T *x, T *y, const T *ak, const T *bk, const T *restrict p, int64_t L,
    int has_b, const int KK) {
  T a0 = ak[0], a1 = KK > 1 ? ak[1] : 0, a2 = KK > 2 ? ak[2] : 0;
  T b0 = bk[0], b1 = KK > 1 ? bk[1] : 0, b2 = KK > 2 ? bk[2] : 0;
  if (has_b) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      T v = x[l];
      T best = v * a0 + b0;
      if (KK > 1) { T u = v * a1 + b1; best = u > best ? u : best; }
      if (KK > 2) { T u = v * a2 + b2; best = u > best ? u : best; }
      y[l] = p ? best * p[l] : best;
    }
  } else {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      T v = x[l];
      T best = v * a0;
      if (KK > 1) { T u = v * a1; best = u > best ? u : best; }
      if (KK > 2) { T u = v * a2; best = u > best ? u : best; }
      y[l] = p ? best * p[l] : best;
    }
  }
}

static inline __attribute__((always_inline)) void CAT(fwd_dispatch, SUF)(
    const T *x, T *y, const T *ak, const T *bk, const T *p, int64_t L, int has_b, int64_t K) {
  if (K == 1) CAT(fwd_row, SUF)(x, y, ak, bk, p, L, has_b, 1);
  else if (K == 2) CAT(fwd_row, SUF)(x, y, ak, bk, p, L, has_b, 2);
  else CAT(fwd_row, SUF)(x, y, ak, bk, p, L, has_b, 3);
}

/* the LANES partial sums added in one fixed (pairwise) order */
static inline __attribute__((always_inline)) T CAT(lane_total, SUF)(const T *acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* sum of xr[b0:e) in LANES partial sums (fixed order); sq: of (xr - m)^2 instead */
static inline __attribute__((always_inline)) T CAT(block_sum, SUF)(const T *xr, int64_t b0, int64_t e, int sq, T m) {
  typedef T V __attribute__((vector_size(LANES * sizeof(T))));
  V acc = {};
  int64_t l = b0;
  for (; l + LANES <= e; l += LANES) {
    V v;
    memcpy(&v, xr + l, sizeof v);
    if (sq) { v = v - m; v = v * v; }
    acc += v;
  }
  T lanes[LANES];
  memcpy(lanes, &acc, sizeof acc);
  T s = CAT(lane_total, SUF)(lanes);
  for (; l < e; ++l) {
    T d = sq ? xr[l] - m : xr[l];
    s += sq ? d * d : d;
  }
  return s;
}

/* sum of xr[0:L) in float blocks of BLOCK, carried in double */
static inline double CAT(row_sum, SUF)(const T *xr, int64_t L) {
  double s = 0;
  for (int64_t b0 = 0; b0 < L; b0 += BLOCK) {
    int64_t e = b0 + BLOCK < L ? b0 + BLOCK : L;
    s += CAT(block_sum, SUF)(xr, b0, e, 0, 0);
  }
  return s;
}

/* sum of a[0:n) b[0:n) in LANES partial sums (fixed order) */
static inline __attribute__((always_inline)) T CAT(dot, SUF)(const T *a, const T *b, int64_t n) {
  typedef T V __attribute__((vector_size(LANES * sizeof(T))));
  V acc = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    V u, v;
    memcpy(&u, a + i, sizeof u);
    memcpy(&v, b + i, sizeof v);
    acc += u * v;
  }
  T lanes[LANES];
  memcpy(lanes, &acc, sizeof acc);
  T s = CAT(lane_total, SUF)(lanes);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

/* task = (sample n, chunk j of positions [l0, l1)) of the position-chunked kernels */
static inline void CAT(chunk_range, SUF)(int64_t task, int64_t chunks, int64_t L, int64_t *n, int64_t *j,
                                         int64_t *l0, int64_t *l1) {
  int64_t per = (L + chunks - 1) / chunks;
  *n = task / chunks;
  *j = task % chunks;
  *l0 = *j * per;
  *l1 = *l0 + per < L ? *l0 + per : L;
}

void CAT(dyrelu_fwd, SUF)(const T *x, T *y, const T *a, const T *b, const T *pi, int64_t N,
                          int64_t C, int64_t L, int64_t K, int64_t W, int64_t threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (N * C * L >= PARALLEL_MIN && threads > 1)
  for (int64_t n = 0; n < N; ++n)
  for (int64_t c = 0; c < C; ++c) {
    int64_t r = n * C + c;
    T ak[3] = {0, 0, 0}, bk[3] = {0, 0, 0}; /* K >= 1 fills them; the zeros quiet -Wmaybe-uninitialized */
    CAT(load_coef, SUF)(a, b, n, c, K, W, ak, bk);
    CAT(fwd_dispatch, SUF)(x + r * L, y + r * L, ak, bk, pi ? pi + n * L : NULL, L, b != NULL, K);
  }
}

/* The backward over [l0, l1) one position at a time: grad_x, and g x, g of the winning segment added
 * into acc = (x0, g0, x1, g1, x2, g2) (the order of the vector loop's lanes below). */
static inline __attribute__((always_inline)) void CAT(bwd_scalar, SUF)(
    const T *restrict g, const T *restrict x, T *restrict gx, const T *ak, const T *bk,
    const T *restrict p, T *restrict gp, int64_t l0, int64_t l1, T *acc, const int KK, const int HAS_P) {
  T a0 = ak[0], a1 = KK > 1 ? ak[1] : 0, a2 = KK > 2 ? ak[2] : 0;
  T b0 = bk[0], b1 = KK > 1 ? bk[1] : 0, b2 = KK > 2 ? bk[2] : 0;
  for (int64_t l = l0; l < l1; ++l) {
    T v = x[l], gv = g[l];
    T best = v * a0 + b0;
    int k = 0;
    if (KK > 1) { T u = v * a1 + b1; if (u > best) { best = u; k = 1; } }
    if (KK > 2) { T u = v * a2 + b2; if (u > best) { best = u; k = 2; } }
    if (HAS_P) { gp[l] += gv * best; gv = gv * p[l]; }
    T ak_sel = k == 0 ? a0 : k == 1 ? a1 : a2;
    gx[l] = gv * ak_sel;
    acc[2 * k] += gv * v;
    acc[2 * k + 1] += gv;
  }
}

/* acc (x0, g0, x1, g1, x2, g2) added into the row's double sums */
static inline __attribute__((always_inline)) void CAT(bwd_fold, SUF)(const T *acc, double *sx, double *sg,
                                                                     const int KK) {
  for (int k = 0; k < KK; ++k) { sx[k] += acc[2 * k]; sg[k] += acc[2 * k + 1]; }
}

/* One row segment [l0, l1) of the backward: grad_x, the per-segment sums (added into sx, sg),
 * and, with pi, g * max_k(..) added into gp[l] (the caller owns gp over [l0, l1)). */
static inline __attribute__((always_inline)) void CAT(bwd_row, SUF)(
    const T *restrict g, const T *restrict x, T *restrict gx, const T *ak, const T *bk,
    const T *restrict p, T *restrict gp, int64_t l0, int64_t l1, double *sx, double *sg,
    const int KK, const int HAS_P) {
  T a0 = ak[0], a1 = KK > 1 ? ak[1] : 0, a2 = KK > 2 ? ak[2] : 0;
  T b0 = bk[0], b1 = KK > 1 ? bk[1] : 0, b2 = KK > 2 ? bk[2] : 0;
  if (l1 - l0 < SHORT_ROW) { /* deep layers (L = 1..16): plain loop, no vector set-up per row */
    T acc[6] = {0, 0, 0, 0, 0, 0};
    CAT(bwd_scalar, SUF)(g, x, gx, ak, bk, p, gp, l0, l1, acc, KK, HAS_P);
    CAT(bwd_fold, SUF)(acc, sx, sg, KK);
    return;
  }
  for (int64_t s = l0; s < l1; s += BLOCK) {
    int64_t e = s + BLOCK < l1 ? s + BLOCK : l1;
    /* per-lane partial sums of g x and g for each segment (see LANES), in GCC vector types: one
     * AVX-512 register, two AVX2 or four SSE2 registers per LANES-wide value, elementwise IEEE
     * operations in every case */
    typedef T V __attribute__((vector_size(LANES * sizeof(T))));
    typedef decltype(V{} > V{}) M;
    const V zero = {};
    V x0v = {}, x1v = {}, x2v = {}, g0v = {}, g1v = {}, g2v = {};
    int64_t l = s;
    for (; l + LANES <= e; l += LANES) {
      V v, gv;
      memcpy(&v, x + l, sizeof v);
      memcpy(&gv, g + l, sizeof gv);
      V best = v * a0 + b0;
      M s1 = {}, s2 = {};
      if (KK > 1) { V u = v * a1 + b1; s1 = u > best; best = s1 ? u : best; }
      if (KK > 2) { V u = v * a2 + b2; s2 = u > best; best = s2 ? u : best; s1 = s2 ? M{} : s1; }
      if (HAS_P) {
        V pv, gpv;
        memcpy(&pv, p + l, sizeof pv);
        memcpy(&gpv, gp + l, sizeof gpv);
        gpv += gv * best;
        memcpy(gp + l, &gpv, sizeof gpv);
        gv = gv * pv;
      }
      V gk1 = s1 ? gv : zero, gk2 = s2 ? gv : zero;
      V gk0 = gv - gk1 - gk2; /* exactly gv or 0: only one of gk1, gk2 is non-zero */
      V out = gk0 * a0 + gk1 * a1 + gk2 * a2;
      memcpy(gx + l, &out, sizeof out);
      x0v += gk0 * v; g0v += gk0;
      if (KK > 1) { x1v += gk1 * v; g1v += gk1; }
      if (KK > 2) { x2v += gk2 * v; g2v += gk2; }
    }
    T lanes[6][LANES];
    memcpy(lanes[0], &x0v, sizeof x0v); memcpy(lanes[1], &g0v, sizeof g0v);
    memcpy(lanes[2], &x1v, sizeof x1v); memcpy(lanes[3], &g1v, sizeof g1v);
    memcpy(lanes[4], &x2v, sizeof x2v); memcpy(lanes[5], &g2v, sizeof g2v);
    T acc[6];
    for (int i = 0; i < 6; ++i) acc[i] = CAT(lane_total, SUF)(lanes[i]);
    CAT(bwd_scalar, SUF)(g, x, gx, ak, bk, p, gp, l, e, acc, KK, HAS_P); /* the block's last l % LANES positions */
    CAT(bwd_fold, SUF)(acc, sx, sg, KK);
  }
}

static inline __attribute__((always_inline)) void CAT(bwd_dispatch, SUF)(
    const T *g, const T *x, T *gx, const T *ak, const T *bk, const T *p, T *gp, int64_t l0,
    int64_t l1, double *sx, double *sg, int64_t K) {
  if (p) {
    if (K == 1) CAT(bwd_row, SUF)(g, x, gx, ak, bk, p, gp, l0, l1, sx, sg, 1, 1);
    else if (K == 2) CAT(bwd_row, SUF)(g, x, gx, ak, bk, p, gp, l0, l1, sx, sg, 2, 1);
    else CAT(bwd_row, SUF)(g, x, gx, ak, bk, p, gp, l0, l1, sx, sg, 3, 1);
  } else {
    if (K == 1) CAT(bwd_row, SUF)(g, x, gx, ak, bk, p, gp, l0, l1, sx, sg, 1, 0);
    else if (K == 2) CAT(bwd_row, SUF)(g, x, gx, ak, bk, p, gp, l0, l1, sx, sg, 2, 0);
    else CAT(bwd_row, SUF)(g, x, gx, ak, bk, p, gp, l0, l1, sx, sg, 3, 0);
  }
}

/* Without pi: rows in parallel; sum_gx, sum_g are (N, K, C). */
void CAT(dyrelu_bwd, SUF)(const T *g, const T *x, T *gx, const T *a, const T *b, T *sum_gx,
                          T *sum_g, int64_t N, int64_t C, int64_t L, int64_t K, int64_t W,
                          int64_t threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (N * C * L >= PARALLEL_MIN && threads > 1)
  for (int64_t n = 0; n < N; ++n)
  for (int64_t c = 0; c < C; ++c) {
    int64_t r = n * C + c;
    T ak[3], bk[3];
    double sx[3] = {0, 0, 0}, sg[3] = {0, 0, 0};
    CAT(load_coef, SUF)(a, b, n, c, K, W, ak, bk);
    CAT(bwd_dispatch, SUF)(g + r * L, x + r * L, gx + r * L, ak, bk, NULL, NULL, 0, L, sx, sg, K);
    for (int64_t k = 0; k < K; ++k) {
      sum_gx[(n * K + k) * C + c] = (T)sx[k];
      sum_g[(n * K + k) * C + c] = (T)sg[k];
    }
  }
}

/* With pi (variant C): tasks (n, chunk of positions) in parallel, each looping over all channels
 * so that it owns grad_pi over its positions; the per-(n, k, c) sums go to per-chunk partials
 * part_gx, part_g (chunks, N, K, C), which the caller adds up. grad_pi is (N, L). */
void CAT(dyrelu_bwd_pi, SUF)(const T *g, const T *x, T *gx, const T *a, const T *b, const T *pi,
                             T *grad_pi, T *part_gx, T *part_g, int64_t N, int64_t C, int64_t L,
                             int64_t K, int64_t W, int64_t chunks, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (N * C * L >= PARALLEL_MIN && threads > 1)
  for (int64_t task = 0; task < N * chunks; ++task) {
    int64_t n, j, l0, l1;
    CAT(chunk_range, SUF)(task, chunks, L, &n, &j, &l0, &l1);
    T *gp = grad_pi + n * L;
    for (int64_t l = l0; l < l1; ++l) gp[l] = 0;
    for (int64_t c = 0; c < C; ++c) {
      int64_t r = n * C + c;
      T ak[3], bk[3];
      double sx[3] = {0, 0, 0}, sg[3] = {0, 0, 0};
      CAT(load_coef, SUF)(a, b, n, c, K, W, ak, bk);
      if (l1 > l0)
        CAT(bwd_dispatch, SUF)(g + r * L, x + r * L, gx + r * L, ak, bk, pi + n * L, gp, l0, l1, sx, sg, K);
      for (int64_t k = 0; k < K; ++k) {
        part_gx[((j * N + n) * K + k) * C + c] = (T)sx[k];
        part_g[((j * N + n) * K + k) * C + c] = (T)sg[k];
      }
    }
  }
}

/* Per-row mean and biased variance (two passes over the row, the second from cache). */
void CAT(row_moments, SUF)(const T *x, T *mean, T *var, int64_t rows, int64_t L, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * L >= PARALLEL_MIN && threads > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T *xr = x + r * L;
    if (L < SHORT_ROW) {
      double s = 0, q = 0;
      for (int64_t l = 0; l < L; ++l) s += xr[l];
      double m = s / (double)L;
      for (int64_t l = 0; l < L; ++l) { double d = xr[l] - m; q += d * d; }
      mean[r] = (T)m;
      var[r] = (T)(q / (double)L);
      continue;
    }
    double m = CAT(row_sum, SUF)(xr, L) / (double)L;
    T mt = (T)m;
    double q = 0;
    for (int64_t b0 = 0; b0 < L; b0 += BLOCK) {
      int64_t e = b0 + BLOCK < L ? b0 + BLOCK : L;
      q += CAT(block_sum, SUF)(xr, b0, e, 1, mt);
    }
    /* the mean's own rounding (mt vs m) adds (m - mt)^2, removed exactly in double */
    double dm = m - (double)mt;
    double v = q / (double)L - dm * dm;
    mean[r] = (T)m;
    var[r] = (T)(v > 0 ? v : 0);
  }
}

/* Inference-mode DY-ReLU site (see DyReLU / InferenceDyReLU): for each sample n
 *   p = mean_L x[n];  h = relu(W1 p + b1);  l = W2 h + b2;  coef = offset + scale * sigmoid(l)
 *   a_k = coef[k W + w], b_k = coef[(K + k) W + w];  y[n] = max_k(a_k x + b_k)
 * W1 (H, C), W2 (2 K W, H) row-major. One parallel region; y may be x. Returns 0, or -1 if out of memory. */
int CAT(dyrelu_site, SUF)(const T *x, T *y, const T *w1, const T *b1, const T *w2, const T *b2,
                          const T *offset, const T *scale, int64_t N, int64_t C, int64_t L, int64_t H,
                          int64_t K, int64_t W, int64_t threads) {
  int64_t G = 2 * K * W;
  T *pooled = (T *)malloc(sizeof(T) * (size_t)(N * (C + H + G)));
  if (!pooled) return -1;
  T *hid = pooled + N * C, *coef = hid + N * H;
  int par = N * C * L >= PARALLEL_MIN && threads > 1;
#pragma omp parallel num_threads(threads) if (par)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N * C; ++r) {
      pooled[r] = (T)(CAT(row_sum, SUF)(x + r * L, L) / (double)L);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N * H; ++i) {
      int64_t n = i / H, j = i % H;
      const T *wr = w1 + j * C, *p = pooled + n * C;
      T acc = CAT(dot, SUF)(wr, p, C) + b1[j];
      hid[i] = acc > 0 ? acc : 0;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N * G; ++i) {
      int64_t n = i / G, j = i % G;
      const T *wr = w2 + j * H, *h = hid + n * H;
      T acc = CAT(dot, SUF)(wr, h, H) + b2[j];
      coef[i] = offset[j] + scale[j] * (T)(1.0 / (1.0 + exp(-(double)acc)));
    }
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      int64_t r = n * C + c, wc = W == 1 ? 0 : c;
      T ak[3], bk[3];
      for (int64_t k = 0; k < K; ++k) {
        ak[k] = coef[n * G + k * W + wc];
        bk[k] = coef[n * G + (K + k) * W + wc];
      }
      CAT(fwd_dispatch, SUF)(x + r * L, y + r * L, ak, bk, NULL, L, 1, K);
    }
  }
  free(pooled);
  return 0;
}

/* z[n, l] = bias[0] + sum_c w[c] x[n, c, l]: tasks (n, chunk of positions), channels outer. */
void CAT(spatial_fwd, SUF)(const T *x, const T *w, const T *bias, T *z, int64_t N, int64_t C, int64_t L,
                           int64_t chunks, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (N * C * L >= PARALLEL_MIN && threads > 1)
  for (int64_t task = 0; task < N * chunks; ++task) {
    int64_t n, j, l0, l1;
    CAT(chunk_range, SUF)(task, chunks, L, &n, &j, &l0, &l1);
    T *zn = z + n * L;
    for (int64_t l = l0; l < l1; ++l) zn[l] = 0;
    for (int64_t c = 0; c < C; ++c) {
      const T *xr = x + (n * C + c) * L;
      T wc = w[c];
#pragma omp simd
      for (int64_t l = l0; l < l1; ++l) zn[l] += wc * xr[l];
    }
    for (int64_t l = l0; l < l1; ++l) zn[l] += bias[0];
  }
}

/* grad_x[n, c, l] = w[c] gz[n, l];  part_w[n, c] = sum_l gz[n, l] x[n, c, l] (the caller sums over n) */
void CAT(spatial_bwd, SUF)(const T *x, const T *w, const T *gz, T *gx, T *part_w, int64_t N, int64_t C,
                           int64_t L, int64_t threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (N * C * L >= PARALLEL_MIN && threads > 1)
  for (int64_t n = 0; n < N; ++n)
  for (int64_t c = 0; c < C; ++c) {
    int64_t r = n * C + c;
    const T *xr = x + r * L, *g = gz + n * L;
    T *o = gx + r * L;
    T wc = w[c];
    double s = 0;
    for (int64_t b0 = 0; b0 < L; b0 += BLOCK) {
      int64_t e = b0 + BLOCK < L ? b0 + BLOCK : L;
      for (int64_t l = b0; l < e; ++l) o[l] = wc * g[l];
      s += CAT(dot, SUF)(g + b0, xr + b0, e - b0);
    }
    part_w[r] = (T)s;
  }
}

/* gx[n, c, l] = gx[n, c, l] + (x[n, c, l] alpha[c] + beta[n, c]) */
void CAT(affine_add, SUF)(const T *x, T *gx, const T *alpha, const T *beta, int64_t N, int64_t C, int64_t L,
                          int64_t threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (N * C * L >= PARALLEL_MIN && threads > 1)
  for (int64_t n = 0; n < N; ++n)
  for (int64_t c = 0; c < C; ++c) {
    int64_t r = n * C + c;
    const T *xr = x + r * L;
    T *o = gx + r * L;
    T al = alpha[c], be = beta[r];
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) o[l] = o[l] + (xr[l] * al + be);
  }
}

#endif
