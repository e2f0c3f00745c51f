// x @ W.T for a float weight (bfloat16 or float32) kept as stored ([N, K], row by row; a tied output layer shares
// it with the embedding), for the few activation rows of a decode step. PyTorch's CPU product at one row read a
// bfloat16 weight at 8-16 GB/s here, cache-resident or not (576 x 576, in L2: 40 us; this kernel: 9 us), where the
// memory gives 40; a float32 one at 11 GB/s from memory.
//
// Three paths, the same sums up to the order of float additions:
//   `bf16_mm`         AVX2 and FMA: each bfloat16 weight widened to float (a shift: exact) and multiplied by FMA;
//   `bf16_mm_avx512`  AVX-512 BF16: `dpbf16ps` multiplies 32 pairs of bfloat16 and adds them into 16 floats;
//   `f32_mm`          AVX2 and FMA on float32 weights and activations.
// Each sums an output in float (bfloat16: then rounds it once, to nearest even), as PyTorch's product does.
// R output rows at a time (contiguous in memory: one stream) for up to MB activation rows, whose accumulators stay
// in registers; the activations (a few KiB) stay in the L1 cache.
//
// Built at run time by glm_core/models/cpu_kernels.py with the other kernels; `load_dense` times the paths against
// PyTorch's product and keeps each where it is faster.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"  // load8, hsum

namespace {

#define GLM_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
inline bool has_avx512_bf16() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
}

constexpr int R = 4;  // output rows at a time

// AVX2: rows n0..n0+RR-1 of a bfloat16 or float weight for activation rows m0..m0+MB-1 (as floats, `xf`); 8
// channels a step.
template <int RR, int MB, typename W>
void tile_avx2(const float* xf, int64_t m0, const W* w, int64_t K, int64_t n0, W* out, int64_t N) {
  __m256 acc[RR][MB];
  for (int r = 0; r < RR; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[RR];
    for (int r = 0; r < RR; ++r) wv[r] = load8(w + r * K + k);
    for (int j = 0; j < MB; ++j) {
      const __m256 xv = _mm256_loadu_ps(xf + (m0 + j) * K + k);
      for (int r = 0; r < RR; ++r) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]);
    }
  }
  for (int j = 0; j < MB; ++j)
    for (int r = 0; r < RR; ++r) out[(m0 + j) * N + n0 + r] = W(hsum(acc[r][j]));
}

// AVX-512 BF16: the same with 32 channels a step.
template <int RR, int MB>
GLM_BF16 void tile_avx512(const at::BFloat16* x, int64_t m0, const at::BFloat16* w, int64_t K, int64_t n0,
                          at::BFloat16* out, int64_t N) {
  __m512 acc[RR][MB];
  for (int r = 0; r < RR; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[RR];
    for (int r = 0; r < RR; ++r) wv[r] = _mm512_loadu_si512(w + r * K + k);
    for (int j = 0; j < MB; ++j) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + j) * K + k);
      for (int r = 0; r < RR; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)wv[r], xv);
    }
  }
  for (int j = 0; j < MB; ++j)
    for (int r = 0; r < RR; ++r) out[(m0 + j) * N + n0 + r] = at::BFloat16(_mm512_reduce_add_ps(acc[r][j]));
}

// All M activation rows through output rows n0..n0+RR-1: MB rows at a time, then the 1-3 left.
template <int RR, int MB, typename W>
void rows_avx2(const float* xf, int64_t M, const W* w, int64_t K, int64_t n0, W* out, int64_t N) {
  int64_t m = 0;
  for (; m + MB <= M; m += MB) tile_avx2<RR, MB>(xf, m, w, K, n0, out, N);
  for (; m < M; ++m) tile_avx2<RR, 1>(xf, m, w, K, n0, out, N);
}

template <int RR>
GLM_BF16 void rows_avx512(const at::BFloat16* x, int64_t M, const at::BFloat16* w, int64_t K, int64_t n0,
                          at::BFloat16* out, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_avx512<RR, 4>(x, m, w, K, n0, out, N);
  switch (M - m) {
    case 3: tile_avx512<RR, 3>(x, m, w, K, n0, out, N); break;
    case 2: tile_avx512<RR, 2>(x, m, w, K, n0, out, N); break;
    case 1: tile_avx512<RR, 1>(x, m, w, K, n0, out, N); break;
  }
}

at::Tensor dense_mm(const at::Tensor& x_in, const at::Tensor& weight, at::ScalarType dtype, bool avx512) {
  const char* name = dtype == at::kFloat ? "f32_mm" : avx512 ? "bf16_mm_avx512" : "bf16_mm";
  const char* type = dtype == at::kFloat ? "float32" : "bfloat16";
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2, name, ": x must be [rows, in], the weight [out, in]");
  TORCH_CHECK(x_in.scalar_type() == dtype && weight.scalar_type() == dtype, name, ": x and the weight must be ", type);
  TORCH_CHECK(weight.is_contiguous(), name, ": the weight must be contiguous");
  TORCH_CHECK(!avx512 || has_avx512_bf16(), name, ": this CPU has no AVX-512 BF16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && K % 32 == 0, name, ": in_features must be the weight's and tile by 32");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  // Enough row groups a task that a thread reads about 32 KiB of weight per call of the lambda.
  const int64_t groups = (N + R - 1) / R, grain = std::max<int64_t>(1, 32768 / (R * K * weight.element_size()));
  auto each_group = [&](auto rows, auto single) {
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t n0 = g * R;
        if (n0 + R <= N)
          rows(n0);
        else
          for (int64_t n = n0; n < N; ++n) single(n);  // the last N % R rows, one at a time
      }
    });
  };
  if (dtype == at::kFloat) {
    const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
    float* op = out.data_ptr<float>();
    each_group([&](int64_t n0) { rows_avx2<R, 2>(xp, M, wp + n0 * K, K, n0, op, N); },
               [&](int64_t n) { rows_avx2<1, 2>(xp, M, wp + n * K, K, n, op, N); });
    return out;
  }
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = weight.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  if (avx512) {
    each_group([&](int64_t n0) { rows_avx512<R>(xp, M, wp + n0 * K, K, n0, op, N); },
               [&](int64_t n) { rows_avx512<1>(xp, M, wp + n * K, K, n, op, N); });
    return out;
  }
  std::vector<float> xf(M * K);  // the AVX2 path's activations as floats
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = static_cast<float>(xp[i]);
  each_group([&](int64_t n0) { rows_avx2<R, 2>(xf.data(), M, wp + n0 * K, K, n0, op, N); },
             [&](int64_t n) { rows_avx2<1, 2>(xf.data(), M, wp + n * K, K, n, op, N); });
  return out;
}

at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& w) { return dense_mm(x, w, at::kBFloat16, false); }
at::Tensor bf16_mm_avx512(const at::Tensor& x, const at::Tensor& w) { return dense_mm(x, w, at::kBFloat16, true); }
at::Tensor f32_mm(const at::Tensor& x, const at::Tensor& w) { return dense_mm(x, w, at::kFloat, false); }
bool avx512_bf16_supported() { return has_avx512_bf16(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm_cpu, m) {
  m.def("bf16_mm(Tensor x, Tensor weight) -> Tensor");
  m.def("bf16_mm_avx512(Tensor x, Tensor weight) -> Tensor");
  m.def("f32_mm(Tensor x, Tensor weight) -> Tensor");
  m.def("avx512_bf16_supported() -> bool", &avx512_bf16_supported);
}

TORCH_LIBRARY_IMPL(glm_cpu, CPU, m) {
  m.impl("bf16_mm", &bf16_mm);
  m.impl("bf16_mm_avx512", &bf16_mm_avx512);
  m.impl("f32_mm", &f32_mm);
}
