// x @ W.T * scale for an int8 weight with one scale an output row, on x86 CPUs with AVX2 and FMA; only the INT8
// output layer takes it (glm_core/models/quant.py, int8_matmul). The weight stays as stored, [N, K] row by row (a
// tied output layer shares it with the embedding's lookups). As in the INT4 kernel, the activations are quantized
// to int8 blocks of 32 (one float scale a block) and multiplied by integer dot products: |w| (unsigned) times x
// with w's sign, by maddubs, or x + 128 times w by dpbusd where the CPU has AVX-512 VNNI (`int8_mm_vnni`; the same
// bits). PyTorch's CPU int8 kernel turns each weight into a float: at 16 rows (a batched decode step) it, or the
// dense product after dequantizing, took 40 % of a step on the 49,152-row output layer.
//
// NB output rows at a time for every activation row: the NB weight rows (a few KiB) stay in the L1 cache while all
// activation rows go through them, and each pair's 8 lanes add up once, at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

#include "common.h"  // hsum, quantize_row, has_vnni

namespace {

constexpr int NB = 4;  // output rows at a time

// Output rows n0..n0+R-1 for all M activation rows. A block's 8 int32 lanes each sum 4 products w * x: by
// |w| * (x with w's sign) with maddubs (two bytes a 16-bit sum, at most 2 * 128 * 127: no saturation) and madd.
template <int R, typename S, typename O>
void rows_avx2(const int8_t* xq, const float* xd, int64_t M, const int8_t* w, const S* scales, int64_t K, int64_t n0,
               O* out, int64_t N) {
  const int64_t blocks = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < M; ++m) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * 32));
      const __m256 d = _mm256_set1_ps(xd[m * blocks + b]);
      for (int r = 0; r < R; ++r) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + b * 32));
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[m * N + n0 + r] = static_cast<O>(hsum(acc[r]) * static_cast<float>(scales[r]));
  }
}

// The same with AVX-512 VNNI's dpbusd, which takes unsigned bytes times signed ones: the activations come as
// x + 128 (`xu`), and each block's sums start from -128 times the weight's own 4-byte sums (made once a call for
// these R rows, by dpbusd with ones), so that they come out as those of x: the AVX2 path's integers, then its
// float operations, so the same bits. 3 instructions a block and row where AVX2 needs 6.
template <int R, typename S, typename O>
GLM_VNNI void rows_vnni(const uint8_t* xu, const float* xd, int64_t M, const int8_t* w, const S* scales, int64_t K,
                         int64_t n0, O* out, int64_t N) {
  const int64_t blocks = K / 32;
  thread_local std::vector<int32_t> start;
  start.resize(R * blocks * 8);
  const __m256i ones = _mm256_set1_epi8(1);
  for (int r = 0; r < R; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + b * 32));
      const __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, wv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(start.data() + (r * blocks + b) * 8),
                          _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 7)));
    }
  for (int64_t m = 0; m < M; ++m) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xu + m * K + b * 32));
      const __m256 d = _mm256_set1_ps(xd[m * blocks + b]);
      for (int r = 0; r < R; ++r) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + b * 32));
        const __m256i from = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start.data() + (r * blocks + b) * 8));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(from, xv, wv)), d, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[m * N + n0 + r] = static_cast<O>(hsum(acc[r]) * static_cast<float>(scales[r]));
  }
}


at::Tensor int8_mm_path(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales, bool vnni) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2 && scales.dim() == 1, "int8_mm: bad ranks");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(), "int8_mm: the weight must be int8, contiguous");
  TORCH_CHECK(!vnni || has_vnni(), "int8_mm_vnni: this CPU has no AVX-512 VNNI");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K % 32 == 0 && weight.size(1) == K, "int8_mm: K must be the weight's and tile by 32");
  TORCH_CHECK(scales.size(0) == N && scales.is_contiguous(), "int8_mm: one scale an output row");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16 ||
                  scales.scalar_type() == at::kHalf,
              "int8_mm: scales must be float32, bfloat16 or float16");
  const int64_t blocks = K / 32;
  std::vector<float> scratch(M * K / 4 + 2 * M * blocks);  // int8 values, then a scale and a sum a block
  int8_t* xq = reinterpret_cast<int8_t*>(scratch.data());
  float *xd = scratch.data() + M * K / 4, *xs = xd + M * blocks;
  std::vector<uint8_t> xu(vnni ? M * K : 0);  // the VNNI path's activations, x + 128
  at::Tensor out = at::empty({M, N}, x.options());
  const int8_t* wp = weight.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_mm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        quantize_row(xp + m * K, K, xq + m * K, xd + m * blocks, xs + m * blocks);
        if (vnni)
          for (int64_t k = m * K; k < (m + 1) * K; ++k) xu[k] = static_cast<uint8_t>(xq[k]) ^ 0x80;  // x + 128
      }
    });
    scalar_t* op = out.data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scales.scalar_type(), "int8_mm_scales", [&] {
      using S = scalar_t;
      const S* sp = scales.data_ptr<S>();
      // Enough row groups a task that a thread streams about 64 KiB of weight per activation row.
      const int64_t groups = (N + NB - 1) / NB, grain = std::max<int64_t>(1, 65536 / (NB * K * M));
      at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t n0 = g * NB;
          const int8_t* w = wp + n0 * K;
          if (n0 + NB <= N) {
            if (vnni)
              rows_vnni<NB>(xu.data(), xd, M, w, sp + n0, K, n0, op, N);
            else
              rows_avx2<NB>(xq, xd, M, w, sp + n0, K, n0, op, N);
          } else {
            for (int64_t n = n0; n < N; ++n) {  // the last N % NB rows, one at a time
              if (vnni)
                rows_vnni<1>(xu.data(), xd, M, wp + n * K, sp + n, K, n, op, N);
              else
                rows_avx2<1>(xq, xd, M, wp + n * K, sp + n, K, n, op, N);
            }
          }
        }
      });
    });
  });
  return out;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  return int8_mm_path(x, weight, scales, false);
}

at::Tensor int8_mm_vnni(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  return int8_mm_path(x, weight, scales, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm_cpu, m) {
  m.def("int8_mm(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int8_mm_vnni(Tensor x, Tensor weight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(glm_cpu, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int8_mm_vnni", &int8_mm_vnni);
}
