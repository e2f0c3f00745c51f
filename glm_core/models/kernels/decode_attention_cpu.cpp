// Attention for a decode step (one query a row) on x86 CPUs with AVX2 and FMA. PyTorch's fused CPU attention is
// built for blocks of queries and its small batched products have a high fixed cost in BF16: for one query a row
// they took 90-120 us a layer at one row (SmolLM2) and 705 at 16 rows, where this reads each key and value row
// once for all the query heads that share it and skips the positions the mask hides.
//
// q [b, heads, 1, d]; k, v [b, kv_heads, positions, d] (any strides but a contiguous last dimension: the slot
// cache's views); mask: none, or bool [b, 1, 1, positions] (true = attend). Query head h reads key/value head
// h / (heads / kv_heads). Scores in float32, softmax in float32, the weighted sum in float32; the output,
// [b, 1, heads, d] in q's dtype, is what transformers' attention functions return.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"  // load8, hsum, store8

namespace {

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q_in.size(2) == 1, "decode_attention: bad shapes");
  const at::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), P = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == KVH && v.size(2) == P && k.size(3) == D &&
                  v.size(3) == D && H % KVH == 0 && D % 8 == 0,
              "decode_attention: q, k, v do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: the last dimension must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "decode_attention: dtypes");
  const bool* mp = nullptr;
  int64_t mask_row = 0;
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = mask_in->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(0) == B && mask.size(1) == 1 &&
                    mask.size(2) == 1 && mask.size(3) == P,
                "decode_attention: the mask must be bool [b, 1, 1, positions]");
    mp = mask.data_ptr<bool>();
    mask_row = P;
  }
  const int64_t G = H / KVH;
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> qf(G * D), acc(G * D), scores(G * P);
      std::vector<int64_t> used(P);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / KVH, h = t % KVH;
        for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(qp[(b * H + h * G) * D + i]) * scale;
        const scalar_t* kb = kp + b * k.stride(0) + h * k.stride(1);
        const scalar_t* vb = vp + b * v.stride(0) + h * v.stride(1);
        int64_t n = 0;
        for (int64_t p = 0; p < P; ++p)
          if (mp == nullptr || mp[b * mask_row + p]) used[n++] = p;
        // scores[g][j] = q_g . k_used[j]: each key row read once for the G query heads that share it
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* kr = kb + used[j] * k.stride(2);
          for (int64_t g = 0; g < G; ++g) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t i = 0; i < D; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[g * D + i]), load8(kr + i), s);
            scores[g * P + j] = hsum(s);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = &scores[g * P];
          float top = -std::numeric_limits<float>::infinity(), total = 0.f;
          for (int64_t j = 0; j < n; ++j) top = std::max(top, sg[j]);
          for (int64_t j = 0; j < n; ++j) total += (sg[j] = std::exp(sg[j] - top));
          const float inv = n ? 1.f / total : 0.f;
          for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* vr = vb + used[j] * v.stride(2);
          for (int64_t i = 0; i < D; i += 8) {
            const __m256 x = load8(vr + i);
            for (int64_t g = 0; g < G; ++g) {
              float* a = &acc[g * D + i];
              _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(scores[g * P + j]), x, _mm256_loadu_ps(a)));
            }
          }
        }
        scalar_t* ob = op + (b * H + h * G) * D;  // out[b, 0, h * G + g, :]
        for (int64_t i = 0; i < G * D; i += 8) store8(ob + i, _mm256_loadu_ps(&acc[i]));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(glm_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
