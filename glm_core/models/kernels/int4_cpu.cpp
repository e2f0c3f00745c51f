// x @ W.T for a 4-bit weight, on x86 CPUs with AVX2 and FMA: the activations are quantized to int8 in blocks of
// 32 (one float scale a block, as GGUF's Q8 blocks) and multiplied with the weight's nibbles by integer dot
// products (maddubs), the way llama.cpp's CPU kernels do. PyTorch's own CPU int4 kernel dequantizes every weight
// to float; at one row that is compute bound, this is bound by memory.
//
// Weight layout, [N, K / 2] bytes, by tiles of 8 output rows (the last N % 8 rows are single rows, below). A tile
// stores each block of 32 input channels k0..k0+31 as 4 chunks of 32 bytes: in chunk j, byte 4r + i holds row r's
// channel k0 + 4j + i in its low nibble and channel k0 + 16 + 4j + i in its high nibble. One chunk thus unpacks
// into two vectors that each hold 4 consecutive channels of all 8 rows, and a broadcast of 4 activation bytes
// multiplies all 8 rows at once: each 32-bit lane of the sum is one output row, no horizontal sums. The tile's
// scales_offsets, [8, K / G, 2] as stored, hold per group g the 8 rows' scales, then their 8 offsets.
// A single row (the last N % 8) stores byte j of a block as channel k0 + j (low nibble) and k0 + 16 + j (high),
// with its [K / G, 2] (scale, offset) pairs. For every row, per group of G input channels: w = q * scale + offset
// (q in 0..15); G is a multiple of 32; scales are bfloat16 or float32.
//
// Up to 4 activation rows go through a tile together, so each weight byte is unpacked once for them (prompts).
// `int4_mm_vnni` is the same product, the same layout and sums, with AVX-512 VNNI (below): 8 rows a tile.
//
// Built at run time by glm_core/models/cpu_kernels.py (g++ -O3 -mavx2 -mfma), only on CPUs that have both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"  // load8, hsum, quantize_row, store8, has_vnni

namespace {

constexpr int TILE = 8;     // output rows a tile
constexpr int ROWS_AT = 4;  // activation rows through a tile together (AVX2)

// Output rows n..n+7 (one tile) for MB activation rows m0..m0+MB-1.
template <int MB, typename S, typename O>
void tile_rows(const int8_t* xq, const float* xd, const float* xg, int64_t m0, const uint8_t* w, const S* so,
               int64_t K, int64_t G, int64_t n, O* out, int64_t N) {
  const int64_t blocks = K / 32, per_group = G / 32, groups = K / G;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 scale = load8(so + g * 2 * TILE), offset = load8(so + g * 2 * TILE + TILE);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m256i nib[8];  // nib[s]: channels 4s..4s+3 (s < 4) or 16 + 4(s - 4).. of each of the 8 rows
      for (int j = 0; j < 4; ++j) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 128 + 32 * j));
        nib[j] = _mm256_and_si256(c, low);
        nib[j + 4] = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
      }
      for (int m = 0; m < MB; ++m) {
        const int8_t* xb = xq + (m0 + m) * K + b * 32;
        // 16 products of at most 15 * 127 a 16-bit lane: 30,480, no overflow.
        __m256i s16 = _mm256_setzero_si256();
        for (int s = 0; s < 8; ++s) {
          int32_t four;  // activations 4s..4s+3 (s < 4) or 16 + 4(s - 4)..
          std::memcpy(&four, xb + (s < 4 ? 4 * s : 16 + 4 * (s - 4)), 4);
          s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(nib[s], _mm256_set1_epi32(four)));
        }
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
        acc[m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(xd[(m0 + m) * blocks + b])), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(offset, _mm256_set1_ps(xg[(m0 + m) * groups + g]), acc[m]);
  }
  for (int m = 0; m < MB; ++m) store8(out + (m0 + m) * N + n, acc[m]);
}

// One output row n in the single-row layout (the last N % 8 rows), for all M activation rows.
template <typename S, typename O>
void single_row(const int8_t* xq, const float* xd, const float* xg, int64_t M, const uint8_t* w, const S* so,
                int64_t K, int64_t G, int64_t n, O* out, int64_t N) {
  const int64_t blocks = K / 32, per_group = G / 32, groups = K / G;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < M; ++m) {
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * 16));
      const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), low);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * 32));
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(nib, xv), ones));
      acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(static_cast<float>(so[2 * (b / per_group)]) * xd[m * blocks + b]), acc);
    }
    for (int64_t g = 0; g < groups; ++g) offsets += static_cast<float>(so[2 * g + 1]) * xg[m * groups + g];
    out[m * N + n] = static_cast<O>(hsum(acc) + offsets);
  }
}

// The same tile of 8 output rows with AVX-512 VNNI: one 64-byte load holds two chunks, whose nibbles make two
// vectors of 16 lanes (lane r: 4 channels of row r from the first chunk, lane 8 + r: from the second), and each
// `dpbusd` multiplies 64 nibbles by 64 activation bytes and adds them in fours into the lanes: 4 instructions a
// block of 32 channels where AVX2 needs 8 maddubs, 8 adds and 8 broadcasts (and a permute each for the lanes'
// activations, from one load of the block). The two halves of a row's integer sum add up before the float part,
// which is the AVX2 path's: both give the same bits. Compiled for AVX-512 alone (the library's other code needs
// only AVX2) and called only where the CPU has it (`has_vnni`).

// The 4-byte groups of a block of 32 activation bytes that the 4 nibble vectors of a block meet, in their order:
// (0, 1) the low nibbles of chunks 0 and 1, (4, 5) their high nibbles, (2, 3) and (6, 7) those of chunks 2, 3;
// the first of a pair goes to lanes 0..7, the second to lanes 8..15.
constexpr int LANE_GROUPS[4][2] = {{0, 1}, {4, 5}, {2, 3}, {6, 7}};

template <int MB, typename S, typename O>
GLM_VNNI void tile_rows_vnni(const int8_t* xq, const float* xd, const float* xg, int64_t m0, const uint8_t* w,
                         const S* so, int64_t K, int64_t G, int64_t n, O* out, int64_t N) {
  const int64_t blocks = K / 32, per_group = G / 32, groups = K / G;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i index[4];
  for (int i = 0; i < 4; ++i) {
    alignas(64) int32_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = LANE_GROUPS[i][l / 8];
    index[i] = _mm512_load_si512(lanes);
  }
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 scale = load8(so + g * 2 * TILE), offset = load8(so + g * 2 * TILE + TILE);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      const __m512i c0 = _mm512_loadu_si512(w + b * 128), c1 = _mm512_loadu_si512(w + b * 128 + 64);
      const __m512i nib[4] = {_mm512_and_si512(c0, low), _mm512_and_si512(_mm512_srli_epi16(c0, 4), low),
                              _mm512_and_si512(c1, low), _mm512_and_si512(_mm512_srli_epi16(c1, 4), low)};
      for (int m = 0; m < MB; ++m) {
        const __m512i both =
            _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m0 + m) * K + b * 32)));
        __m512i d[2];  // two chains of two: with few rows a block's 4 dependent dpbusd would wait on each other
        for (int i = 0; i < 2; ++i) {
          d[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), nib[2 * i], _mm512_permutexvar_epi32(index[2 * i], both));
          d[i] = _mm512_dpbusd_epi32(d[i], nib[2 * i + 1], _mm512_permutexvar_epi32(index[2 * i + 1], both));
        }
        // The block's integer sums, one a row: the same integers as the AVX2 path's, and from here the same float
        // operations in the same order, so both paths give the same bits.
        const __m512i halves = _mm512_add_epi32(d[0], d[1]);
        const __m256i dot = _mm256_add_epi32(_mm512_castsi512_si256(halves), _mm512_extracti32x8_epi32(halves, 1));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, _mm256_set1_ps(xd[(m0 + m) * blocks + b])), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(offset, _mm256_set1_ps(xg[(m0 + m) * groups + g]), acc[m]);
  }
  for (int m = 0; m < MB; ++m) store8(out + (m0 + m) * N + n, acc[m]);
}

constexpr int ROWS_AT_VNNI = 8;  // activation rows through a tile together on the VNNI path

// All M activation rows through one tile at n on the VNNI path, ROWS_AT_VNNI at a time.
template <typename S, typename O>
GLM_VNNI void tile_vnni(const int8_t* xq, const float* xd, const float* xg, int64_t M, const uint8_t* w, const S* so,
                    int64_t K, int64_t G, int64_t n, O* out, int64_t N) {
  int64_t m = 0;
  for (; m + ROWS_AT_VNNI <= M; m += ROWS_AT_VNNI)
    tile_rows_vnni<ROWS_AT_VNNI>(xq, xd, xg, m, w, so, K, G, n, out, N);
  switch (M - m) {
    case 7: tile_rows_vnni<7>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    case 6: tile_rows_vnni<6>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    case 5: tile_rows_vnni<5>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    case 4: tile_rows_vnni<4>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    case 3: tile_rows_vnni<3>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    case 2: tile_rows_vnni<2>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    case 1: tile_rows_vnni<1>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    default: break;
  }
}

// All M activation rows through one tile at n on the AVX2 path, ROWS_AT at a time.
template <typename S, typename O>
void tile_avx2(const int8_t* xq, const float* xd, const float* xg, int64_t M, const uint8_t* w, const S* so,
               int64_t K, int64_t G, int64_t n, O* out, int64_t N) {
  int64_t m = 0;
  for (; m + ROWS_AT <= M; m += ROWS_AT) tile_rows<ROWS_AT>(xq, xd, xg, m, w, so, K, G, n, out, N);
  switch (M - m) {
    case 3: tile_rows<3>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    case 2: tile_rows<2>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    case 1: tile_rows<1>(xq, xd, xg, m, w, so, K, G, n, out, N); break;
    default: break;
  }
}


at::Tensor int4_mm_path(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales_offsets,
                        int64_t group_size, bool vnni) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2 && scales_offsets.dim() == 3, "int4_mm: bad ranks");
  TORCH_CHECK(weight.scalar_type() == at::kByte, "int4_mm: the weight must be uint8");
  TORCH_CHECK(!vnni || has_vnni(), "int4_mm_vnni: this CPU has no AVX-512 VNNI");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K % 32 == 0 && group_size % 32 == 0 && K % group_size == 0, "int4_mm: K and G must tile by 32");
  TORCH_CHECK(weight.size(1) * 2 == K && weight.is_contiguous(), "int4_mm: weight must be [N, K/2], contiguous");
  TORCH_CHECK(scales_offsets.size(0) == N && scales_offsets.size(1) == K / group_size &&
                  scales_offsets.size(2) == 2 && scales_offsets.is_contiguous(),
              "int4_mm: scales_offsets must be [N, K/G, 2], contiguous");
  TORCH_CHECK(scales_offsets.scalar_type() == at::kBFloat16 || scales_offsets.scalar_type() == at::kFloat,
              "int4_mm: scales must be bfloat16 or float32");
  const int64_t blocks = K / 32, groups = K / group_size, per_group = group_size / 32;
  // One allocation for the quantized activations: int8 values, then per block a scale and a sum, per group a sum.
  std::vector<float> scratch(M * K / 4 + 2 * M * blocks + M * groups, 0.f);
  int8_t* xq = reinterpret_cast<int8_t*>(scratch.data());
  float *xd = scratch.data() + M * K / 4, *xs = xd + M * blocks, *xg = xs + M * blocks;
  at::Tensor out = at::empty({M, N}, x.options());
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  const int64_t tiles = N / TILE;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_mm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        quantize_row(xp + m * K, K, xq + m * K, xd + m * blocks, xs + m * blocks);
        for (int64_t b = 0; b < blocks; ++b) xg[m * groups + b / per_group] += xs[m * blocks + b];
      }
    });
    scalar_t* op = out.data_ptr<scalar_t>();
    auto run = [&](auto* sp) {
      // Enough tiles a task that a thread streams about 64 KiB of weight per activation row.
      const int64_t grain = std::max<int64_t>(1, 65536 / (TILE * K / 2 * M));
      at::parallel_for(0, tiles + (N % TILE ? 1 : 0), grain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = TILE * t;
          if (t == tiles) {  // the single rows
            for (int64_t r = n; r < N; ++r)
              single_row(xq, xd, xg, M, wp + r * K / 2, sp + r * groups * 2, K, group_size, r, op, N);
            continue;
          }
          const uint8_t* w = wp + n * K / 2;
          const auto* so = sp + n * groups * 2;
          if (vnni)
            tile_vnni(xq, xd, xg, M, w, so, K, group_size, n, op, N);
          else
            tile_avx2(xq, xd, xg, M, w, so, K, group_size, n, op, N);
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

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales_offsets, int64_t group_size) {
  return int4_mm_path(x, weight, scales_offsets, group_size, false);
}

at::Tensor int4_mm_vnni(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales_offsets,
                        int64_t group_size) {
  return int4_mm_path(x, weight, scales_offsets, group_size, true);
}

bool vnni_supported() { return has_vnni(); }  // both kernels' VNNI paths

}  // namespace

TORCH_LIBRARY(glm_cpu, m) {
  m.def("int4_mm(Tensor x, Tensor weight, Tensor scales_offsets, int group_size) -> Tensor");
  m.def("int4_mm_vnni(Tensor x, Tensor weight, Tensor scales_offsets, int group_size) -> Tensor");
  m.def("vnni_supported() -> bool", &vnni_supported);
}

TORCH_LIBRARY_IMPL(glm_cpu, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_mm_vnni", &int4_mm_vnni);
}
