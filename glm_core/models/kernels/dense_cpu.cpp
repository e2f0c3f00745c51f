// x @ W.T for a float weight (bfloat16 or float32) kept as stored ([N, K], row by row; a tied output layer shares
// it with the embedding), for the few activation rows of a decode step. PyTorch's CPU product at one row read a
// bfloat16 weight at 8-16 GB/s here, cache-resident or not (576 x 576, in L2: 40 us), where the memory gives 25-40;
// a float32 one at 11 GB/s from memory.
//
// Three paths, the same sums up to the order of float additions:
//   `bf16_mm`         AVX2 and FMA: each bfloat16 weight widened to float (a shift: exact) and multiplied by FMA;
//   `bf16_mm_avx512`  AVX-512 BF16: `dpbf16ps` multiplies 32 pairs of bfloat16 and adds them into 16 floats;
//   `f32_mm`          AVX2 and FMA on float32 weights and activations.
// Each sums an output in float (bfloat16: then rounds it once, to nearest even), as PyTorch's product does.
//
// Each thread reads its share of the weight once, front to back, one row after the other: one sequential stream,
// which the hardware prefetcher follows. Each weight row goes through up to 4 activation rows at a time (they stay
// in the L1 cache), into two accumulators per activation row (even and odd blocks of channels), so that the adds
// of one row do not wait on each other. Every output is summed the same way wherever its row sits and however
// many activation rows come with it: a fused q/k/v weight gives each part's bits. (An earlier layout read 4 weight
// rows side by side, 4 streams 1 KiB apart: one thread read 10-12 GB/s where `torch.sum` read 25-30; this one
// reads 24-27.)
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

#include "common.h"  // load8, hsum, has_avx512_bf16, GLM_BF16

namespace {

constexpr int MB = 4;  // activation rows at a time
constexpr int64_t BLOCK_BYTES = 65536;  // weight rows a block: these stay in L2 for the next MB activation rows

// AVX2: weight rows n0..n1-1 (bfloat16 or float) against activation rows m..m+MM-1 of `xf` (floats, [M, K]), 16
// channels an iteration (K is a multiple of 32); outputs into `out` ([M, N]).
template <int MM, typename W>
void rows_avx2(const float* xf, const W* w, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t m, W* out) {
  const float* x = xf + m * K;
  for (int64_t n = n0; n < n1; ++n) {
    const W* wn = w + n * K;
    __m256 acc[MM][2];
    for (int j = 0; j < MM; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 w0 = load8(wn + k), w1 = load8(wn + k + 8);
      for (int j = 0; j < MM; ++j) {
        acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * K + k), acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j * K + k + 8), acc[j][1]);
      }
    }
    for (int j = 0; j < MM; ++j) out[(m + j) * N + n] = W(hsum(_mm256_add_ps(acc[j][0], acc[j][1])));
  }
}

// AVX-512 BF16: the same with 64 channels an iteration, the last 32 (where K % 64 is 32) into the first
// accumulator.
template <int MM>
GLM_BF16 void rows_avx512(const at::BFloat16* xp, const at::BFloat16* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                          int64_t m, at::BFloat16* out) {
  const at::BFloat16* x = xp + m * K;
  for (int64_t n = n0; n < n1; ++n) {
    const at::BFloat16* wn = w + n * K;
    __m512 acc[MM][2];
    for (int j = 0; j < MM; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wn + k), w1 = (__m512bh)_mm512_loadu_si512(wn + k + 32);
      for (int j = 0; j < MM; ++j) {
        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], w0, (__m512bh)_mm512_loadu_si512(x + j * K + k));
        acc[j][1] = _mm512_dpbf16_ps(acc[j][1], w1, (__m512bh)_mm512_loadu_si512(x + j * K + k + 32));
      }
    }
    if (k < K) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wn + k);
      for (int j = 0; j < MM; ++j)
        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], w0, (__m512bh)_mm512_loadu_si512(x + j * K + k));
    }
    for (int j = 0; j < MM; ++j)
      out[(m + j) * N + n] = at::BFloat16(_mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1])));
  }
}

// Weight rows n0..n1-1 through all M activation rows, a block of rows at a time: MB activation rows at a time,
// then the 1-3 left. `rows.operator()<MM>(b0, b1, m)` is one of the above.
template <typename Rows>
void blocks(int64_t M, int64_t K, int64_t element, int64_t n0, int64_t n1, const Rows& rows) {
  const int64_t step = std::max<int64_t>(1, BLOCK_BYTES / (K * element));
  for (int64_t b0 = n0; b0 < n1; b0 += step) {
    const int64_t b1 = std::min(n1, b0 + step);
    int64_t m = 0;
    for (; m + MB <= M; m += MB) rows.template operator()<MB>(b0, b1, m);
    switch (M - m) {
      case 3: rows.template operator()<3>(b0, b1, m); break;
      case 2: rows.template operator()<2>(b0, b1, m); break;
      case 1: rows.template operator()<1>(b0, b1, m); break;
    }
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
  // Enough rows a task that a thread reads at least 32 KiB of weight; each thread's rows are contiguous.
  const int64_t grain = std::max<int64_t>(1, 32768 / (K * weight.element_size()));
  const int64_t element = weight.element_size();
  if (dtype == at::kFloat) {
    const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      blocks(M, K, element, n0, n1, [&]<int MM>(int64_t b0, int64_t b1, int64_t m) {
        rows_avx2<MM>(xp, wp, K, N, b0, b1, m, op);
      });
    });
    return out;
  }
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = weight.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  if (avx512) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      blocks(M, K, element, n0, n1, [&]<int MM>(int64_t b0, int64_t b1, int64_t m) {
        rows_avx512<MM>(xp, wp, K, N, b0, b1, m, op);
      });
    });
    return out;
  }
  std::vector<float> xf(M * K);  // the AVX2 path's activations as floats
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = static_cast<float>(xp[i]);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    blocks(M, K, element, n0, n1, [&]<int MM>(int64_t b0, int64_t b1, int64_t m) {
      rows_avx2<MM>(xf.data(), wp, K, N, b0, b1, m, op);
    });
  });
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
