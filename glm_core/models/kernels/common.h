// Helpers shared by the CPU kernels (AVX2): 8 values of any float type as floats and back, a horizontal sum, a
// row of activations quantized to int8 blocks (the INT4 and INT8 products), and whether the CPU has AVX-512 VNNI
// or AVX-512 BF16.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

// 8 values as floats.
template <typename T>
inline __m256 load8(const T* p) {
  alignas(32) float v[8];
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(v);
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row of activations as int8 blocks of 32: values, one scale (max |x| / 127) and the float sum of each block.
// x / d rounded half to even: the same rounding as torch.round(x / d).
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* q, float* scale, float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4], amax = _mm256_setzero_ps(), s = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = load8(x + b * 32 + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      s = _mm256_add_ps(s, v[i]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 127.f;
    scale[b] = d;
    sum[b] = hsum(s);
    if (d == 0.f) {
      std::fill(q + b * 32, q + b * 32 + 32, int8_t{0});
      continue;
    }
    const __m256 dv = _mm256_set1_ps(d);
    __m256i n[4];
    for (int i = 0; i < 4; ++i)
      n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // int32 -> int16 -> int8 (|n| <= 127, no saturation); the packs interleave 128-bit lanes, the permute undoes it.
    const __m256i w16 = _mm256_packs_epi32(n[0], n[1]), x16 = _mm256_packs_epi32(n[2], n[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, x16), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 32), bytes);
  }
}

template <typename O>
inline void store8(O* p, __m256 v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int i = 0; i < 8; ++i) p[i] = static_cast<O>(f[i]);
}
template <>
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// AVX-512 F, BW, DQ and VL: the base that each AVX-512 path below needs beside its own extension.
inline bool has_avx512_base() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  return yes;
}

// What the products' VNNI paths are compiled for (GLM_VNNI: only those functions; the rest of the library needs
// only AVX2), and whether this CPU has it.
#define GLM_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
inline bool has_vnni() { return has_avx512_base() && __builtin_cpu_supports("avx512vnni"); }

// The same for the dense product's AVX-512 BF16 path (`dpbf16ps`).
#define GLM_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
inline bool has_avx512_bf16() { return has_avx512_base() && __builtin_cpu_supports("avx512bf16"); }

}  // namespace
