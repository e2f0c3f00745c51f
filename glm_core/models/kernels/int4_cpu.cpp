// x @ W.T for a 4-bit weight, on x86 CPUs with AVX2 and FMA: the activations are quantized to int8 in blocks of
// 32 (one float scale a block, as GGUF's Q8 blocks) and multiplied with the weight's nibbles by integer dot
// products (maddubs), the way llama.cpp's CPU kernels do. PyTorch's own CPU int4 kernel dequantizes every weight
// to float; at one row that is compute bound, this is bound by memory.
//
// Weight layout, [N, K / 2] bytes: per block of 32 input channels k0..k0+31, byte j holds k0 + j in its low
// nibble and k0 + 16 + j in its high nibble. scales_offsets, [N, K / G, 2] (bfloat16 or float32): per group of G
// input channels w = q * scale + offset (q in 0..15). G is a multiple of 32.
//
// Built at run time by glm_core/models/cpu_kernels.py (g++ -O3 -mavx2 -mfma), only on CPUs that have both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float load_float(const float* p) { return *p; }
inline float load_float(const at::BFloat16* p) { return static_cast<float>(*p); }

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row of activations as int8 blocks of 32: values, one scale and the float sum of each block.
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* q, float* scale, float* sum) {
  for (int64_t b = 0; b < K / 32; ++b) {
    float v[32], amax = 0.f, s = 0.f;
    for (int j = 0; j < 32; ++j) {
      v[j] = to_float(x[b * 32 + j]);
      amax = std::max(amax, std::fabs(v[j]));
      s += v[j];
    }
    const float d = amax / 127.f;  // x / d, not x * (1 / d): the same rounding as torch.round(x / d)
    for (int j = 0; j < 32; ++j) q[b * 32 + j] = d > 0.f ? static_cast<int8_t>(std::nearbyint(v[j] / d)) : 0;
    scale[b] = d;
    sum[b] = s;
  }
}

// 32 nibbles of one block as bytes 0..15, in input-channel order.
inline __m256i unpack_block(const uint8_t* w) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
}

// The 8 int32 partial sums of nibbles . int8 activations for one block, as floats.
inline __m256 block_dot(__m256i nibbles, __m256i xv) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, xv), _mm256_set1_epi16(1)));
}

// Output rows n0..n1 for M activation rows, R weight rows at a time (R independent sums keep the FMA unit busy).
// One row (a decode step) unpacks the nibbles as it goes; more rows unpack a tile once and reuse it per row.
template <int R, typename S, typename O>
void weight_tile(const int8_t* xq, const float* xd, const float* xg, int64_t M, const uint8_t* w, const S* so,
                 int64_t K, int64_t G, int64_t n, O* out, int64_t N, uint8_t* unpacked) {
  const int64_t blocks = K / 32, per_group = G / 32, groups = K / G;
  float scale[R][512], offset[R][512];  // groups <= 512 is checked by the caller
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      scale[r][g] = load_float(so + (n + r) * groups * 2 + 2 * g);
      offset[r][g] = load_float(so + (n + r) * groups * 2 + 2 * g + 1);
    }
  if (M > 1)
    for (int r = 0; r < R; ++r)
      for (int64_t b = 0; b < blocks; ++b)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(unpacked + (r * blocks + b) * 32),
                            unpack_block(w + (n + r) * (K / 2) + b * 16));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xr = xq + m * K;
    const float* dr = xd + m * blocks;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * 32));
      const int64_t g = b / per_group;
      for (int r = 0; r < R; ++r) {
        const __m256i nib = M > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unpacked + (r * blocks + b) * 32))
                                  : unpack_block(w + (n + r) * (K / 2) + b * 16);
        acc[r] = _mm256_fmadd_ps(block_dot(nib, xv), _mm256_set1_ps(scale[r][g] * dr[b]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float o = 0.f;
      for (int64_t g = 0; g < groups; ++g) o += offset[r][g] * xg[m * groups + g];
      out[m * N + n + r] = static_cast<O>(hsum(acc[r]) + o);
    }
  }
}

at::Tensor int4_mm(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales_offsets,
                   int64_t group_size) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2 && scales_offsets.dim() == 3, "int4_mm: bad ranks");
  TORCH_CHECK(weight.scalar_type() == at::kByte, "int4_mm: the weight must be uint8");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K % 32 == 0 && group_size % 32 == 0 && K % group_size == 0, "int4_mm: K and G must tile by 32");
  TORCH_CHECK(weight.size(1) * 2 == K && weight.is_contiguous(), "int4_mm: weight must be [N, K/2], contiguous");
  TORCH_CHECK(scales_offsets.size(0) == N && scales_offsets.size(1) == K / group_size &&
                  scales_offsets.size(2) == 2 && scales_offsets.is_contiguous(),
              "int4_mm: scales_offsets must be [N, K/G, 2], contiguous");
  const int64_t blocks = K / 32, groups = K / group_size;
  TORCH_CHECK(groups <= 512, "int4_mm: at most 512 groups a row");
  TORCH_CHECK(scales_offsets.scalar_type() == at::kBFloat16 || scales_offsets.scalar_type() == at::kFloat,
              "int4_mm: scales must be bfloat16 or float32");
  // One allocation for the quantized activations: int8 values, then per block a scale and a sum, per group a sum.
  std::vector<float> scratch(M * K / 4 + 2 * M * blocks + M * groups, 0.f);
  int8_t* xq = reinterpret_cast<int8_t*>(scratch.data());
  float *xd = scratch.data() + M * K / 4, *xs = xd + M * blocks, *xg = xs + M * blocks;
  at::Tensor out = at::empty({M, N}, x.options());
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  // Enough output rows a task that a thread streams about 64 KiB of weight per activation row.
  const int64_t tiles = (N + 3) / 4, grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, K / 2 * M));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_mm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) {
      quantize_row(xp + m * K, K, xq + m * K, xd + m * blocks, xs + m * blocks);
      for (int64_t b = 0; b < blocks; ++b) xg[m * groups + b / (group_size / 32)] += xs[m * blocks + b];
    }
    scalar_t* op = out.data_ptr<scalar_t>();
    auto run = [&](auto* sp) {
      at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
        std::vector<uint8_t> unpacked(M > 1 ? 4 * K : 0);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = 4 * t;
          if (n + 4 <= N)
            weight_tile<4>(xq, xd, xg, M, wp, sp, K, group_size, n, op, N, unpacked.data());
          else
            for (int64_t r = n; r < N; ++r)
              weight_tile<1>(xq, xd, xg, M, wp, sp, K, group_size, r, op, N, unpacked.data());
        }
      });
    };
    if (scales_offsets.scalar_type() == at::kBFloat16)
      run(scales_offsets.data_ptr<at::BFloat16>());
    else
      run(scales_offsets.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(glm_cpu, m) {
  m.def("int4_mm(Tensor x, Tensor weight, Tensor scales_offsets, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(glm_cpu, CPU, m) { m.impl("int4_mm", &int4_mm); }
