// Attention of RoE member rows over a request's paged clean history plus their own key/value, in one
// call per layer; see roe_vllm/attention.py (``member_attention`` is the PyTorch reference it must match).
//
//   out[m, h] = softmax([q . K_hist(slots visible at p) , q . k_m] * scale) @ [V_hist ; v_m]
//
// One task per (request, KV head): every query row of that request's members and of the KV head's G
// query heads reads each history key and value straight from the cache blocks (no gather): keys once per 8 query
// rows, values once per 3 query rows and 32 dimensions (the rows' outputs stay in registers).
// Member rows are contiguous per request: rows first[r] .. first[r + 1] - 1 belong to request r.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "avx2_exp.h"

static inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d + 8 <= n; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  float total = _mm_cvtss_f32(lo);
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

// exp of 8 floats (Cephes' expf polynomial, as in avx_mathfun: about 1 ulp; inputs below -88.38 give ~4e-39, not 0,
// which a softmax whose largest term is 1 cannot tell apart). std::exp, one call per score, took half the kernel.
static inline __m256 exp8(__m256 x) {
  return exp8_in_range(_mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f)));
}

// p[0 .. n) = softmax(s[0 .. n)) in place.
static void softmax(float* s, int64_t n) {
  const float top = *std::max_element(s, s + n);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + x), _mm256_set1_ps(top)));
    _mm256_storeu_ps(s + x, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float total = 0.f;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum8);
  for (int c = 0; c < 8; ++c) total += lanes[c];
  for (; x < n; ++x) total += (s[x] = std::exp(s[x] - top));
  const float inverse = 1.f / total;
  for (x = 0; x < n; ++x) s[x] *= inverse;
}

static inline void axpy(float w, const float* x, float* y, int64_t n) {  // y += w * x (vectorised by the compiler)
  for (int64_t d = 0; d < n; ++d) y[d] += w * x[d];
}

// scores[i][s] = q_i . keys[:, s] for NR query rows and 8 slots from s, keys dim-major ([D, BS]): each key vector
// loaded feeds NR FMAs.
template <int NR>
static inline void scores_8(const float* const* q, const float* keys, int64_t BS, int64_t D, int64_t s,
                            float* const* scores) {
  __m256 acc[NR];
  for (int j = 0; j < NR; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k = _mm256_loadu_ps(keys + d * BS + s);
    for (int j = 0; j < NR; ++j) acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(q[j][d]), k, acc[j]);
  }
  for (int j = 0; j < NR; ++j) _mm256_storeu_ps(scores[j] + s, acc[j]);
}

// scores[i][0 .. n) = q_i . keys[:, s] for Q rows, keys dim-major ([D, BS] from slot 0): query rows in blocks of up
// to 8 (one pass over the keys for K <= 9 members of a request), 8 slots per register.
static void scores_dim_major(const float* const* q, int64_t Q, const float* keys, int64_t BS, int64_t D, int64_t n,
                             float* const* scores) {
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    for (int64_t i = 0; i < Q; i += 8) {
      switch (std::min<int64_t>(8, Q - i)) {
        case 8: scores_8<8>(q + i, keys, BS, D, s, scores + i); break;
        case 7: scores_8<7>(q + i, keys, BS, D, s, scores + i); break;
        case 6: scores_8<6>(q + i, keys, BS, D, s, scores + i); break;
        case 5: scores_8<5>(q + i, keys, BS, D, s, scores + i); break;
        case 4: scores_8<4>(q + i, keys, BS, D, s, scores + i); break;
        case 3: scores_8<3>(q + i, keys, BS, D, s, scores + i); break;
        case 2: scores_8<2>(q + i, keys, BS, D, s, scores + i); break;
        default: scores_8<1>(q + i, keys, BS, D, s, scores + i);
      }
    }
  }
  for (; s < n; ++s)
    for (int64_t i = 0; i < Q; ++i) {
      float total = 0.f;
      for (int64_t d = 0; d < D; ++d) total += q[i][d] * keys[d * BS + s];
      scores[i][s] = total;
    }
}

// out_i[0 .. 32) += sum_s p_i[s] * values[s, 0 .. 32) for NR rows, token-major values ([BS, D] from slot 0): each
// value vector loaded feeds NR FMAs, the NR x 32 outputs stay in registers over all slots.
template <int NR>
static inline void weighted_values_32(const float* const* p, const float* values, int64_t D, int64_t n,
                                      float* const* out) {
  __m256 acc[NR][4];
  for (int j = 0; j < NR; ++j)
    for (int c = 0; c < 4; ++c) acc[j][c] = _mm256_loadu_ps(out[j] + 8 * c);
  for (int64_t s = 0; s < n; ++s) {
    const __m256 v0 = _mm256_loadu_ps(values + s * D), v1 = _mm256_loadu_ps(values + s * D + 8);
    const __m256 v2 = _mm256_loadu_ps(values + s * D + 16), v3 = _mm256_loadu_ps(values + s * D + 24);
    for (int j = 0; j < NR; ++j) {
      const __m256 w = _mm256_set1_ps(p[j][s]);
      acc[j][0] = _mm256_fmadd_ps(w, v0, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(w, v1, acc[j][1]);
      acc[j][2] = _mm256_fmadd_ps(w, v2, acc[j][2]);
      acc[j][3] = _mm256_fmadd_ps(w, v3, acc[j][3]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out[j] + 8 * c, acc[j][c]);
}

// out_i += p_i @ values for Q rows (D a multiple of 32): rows in blocks of 3, 32 output columns at a time.
static void weighted_values(const float* const* p, int64_t Q, const float* values, int64_t D, int64_t n,
                            float* const* out) {
  for (int64_t c = 0; c < D; c += 32) {
    for (int64_t i = 0; i < Q; i += 3) {
      const int64_t nr = std::min<int64_t>(3, Q - i);
      float* rows[3];
      for (int64_t j = 0; j < nr; ++j) rows[j] = out[i + j] + c;
      if (nr == 3) weighted_values_32<3>(p + i, values + c, D, n, rows);
      else if (nr == 2) weighted_values_32<2>(p + i, values + c, D, n, rows);
      else weighted_values_32<1>(p + i, values + c, D, n, rows);
    }
  }
}

// A cache block's (key half, value half) of one KV head as floats: [BS, D] each, or [D, BS] when dim-major.
template <typename cache_t>
static const float* region(const cache_t* cache, int64_t offset, int64_t size, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<cache_t, float>) {
    return cache + offset;
  } else {
    scratch.resize(size);
    for (int64_t i = 0; i < size; ++i) scratch[i] = static_cast<float>(cache[offset + i]);
    return scratch.data();
  }
}

template <typename cache_t>
static void attend(const float* q, const float* k_own, const float* v_own, const cache_t* cache, const int64_t* blocks,
                   const int64_t* first, const int64_t* position, float* out, int64_t R, int64_t H, int64_t Hkv,
                   int64_t D, int64_t BS, int64_t block_stride, int64_t head_stride, int64_t blocks_stride,
                   bool keys_major, bool values_major, float scale, int64_t window) {
  const int64_t G = H / Hkv;
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, scratch;
    std::vector<const float*> q_rows;
    std::vector<float*> score_rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / Hkv, g = task % Hkv, p = position[r];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const int64_t X = std::max<int64_t>(0, p - lo) + 1;  // visible history slots + the member's own key
      const int64_t m0 = first[r], Q = (first[r + 1] - m0) * G;
      scores.assign(Q * X, 0.f);
      auto row = [&](int64_t i) { return (m0 + i / G) * H + g * G + i % G; };  // query row i -> [m, h] index
      auto own = [&](int64_t i) { return ((m0 + i / G) * Hkv + g) * D; };       // its member's own key/value
      // each history block once: (its float region, first and end slot of the visible range inside it)
      auto for_blocks = [&](auto&& body) {
        for (int64_t n = lo / BS; n * BS < p; ++n) {
          const int64_t s0 = std::max(lo, n * BS) - n * BS, s1 = std::min(p, (n + 1) * BS) - n * BS;
          const float* kv = region(cache, blocks[r * blocks_stride + n] * block_stride + g * head_stride,
                                   2 * BS * D, scratch);
          body(kv, kv + BS * D, s0, s1, n * BS + s0 - lo);
        }
      };
      q_rows.resize(Q);
      score_rows.resize(Q);
      for (int64_t i = 0; i < Q; ++i) q_rows[i] = q + row(i) * D;
      for_blocks([&](const float* keys, const float*, int64_t s0, int64_t s1, int64_t x0) {
        if (keys_major) {
          for (int64_t i = 0; i < Q; ++i) score_rows[i] = scores.data() + i * X + x0;
          scores_dim_major(q_rows.data(), Q, keys + s0, BS, D, s1 - s0, score_rows.data());
          return;
        }
        for (int64_t i = 0; i < Q; ++i) {
          const float* qi = q + row(i) * D;
          float* si = scores.data() + i * X + x0;
          for (int64_t s = s0; s < s1; ++s) si[s - s0] = dot(qi, keys + s * D, D);
        }
      });
      for (int64_t i = 0; i < Q; ++i) {
        float* si = scores.data() + i * X;
        for (int64_t x = 0; x < X - 1; ++x) si[x] *= scale;
        si[X - 1] = dot(q + row(i) * D, k_own + own(i), D) * scale;
        softmax(si, X);
        float* oi = out + row(i) * D;
        const float* vi = v_own + own(i);
        for (int64_t d = 0; d < D; ++d) oi[d] = si[X - 1] * vi[d];
      }
      std::vector<float*> out_rows(Q);
      std::vector<const float*> prob_rows(Q);
      for (int64_t i = 0; i < Q; ++i) out_rows[i] = out + row(i) * D;
      for_blocks([&](const float*, const float* values, int64_t s0, int64_t s1, int64_t x0) {
        if (!values_major && D % 32 == 0) {
          for (int64_t i = 0; i < Q; ++i) prob_rows[i] = scores.data() + i * X + x0;
          weighted_values(prob_rows.data(), Q, values + s0 * D, D, s1 - s0, out_rows.data());
          return;
        }
        for (int64_t i = 0; i < Q; ++i) {
          const float* pi = scores.data() + i * X + x0;
          float* oi = out_rows[i];
          if (values_major)
            for (int64_t d = 0; d < D; ++d) oi[d] += dot(pi, values + d * BS + s0, s1 - s0);
          else
            for (int64_t s = s0; s < s1; ++s) axpy(pi[s - s0], values + s * D, oi, D);
        }
      });
    }
  });
}

// query [M, H, D], key/value [M, Hkv, D] (fp32, contiguous); kv_cache [blocks, Hkv, 2 * block_size * D, ...]
// with the key half first; blocks [R, N] (long): each request's KV blocks; first [R + 1]; position [R].
torch::Tensor member_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor kv_cache,
                               torch::Tensor blocks, torch::Tensor first, torch::Tensor position, int64_t block_size,
                               bool keys_major, bool values_major, double scale, int64_t window) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && key.dtype() == torch::kFloat32 && value.dtype() == torch::kFloat32,
              "member_attention: query, key and value must be float32");
  TORCH_CHECK(query.is_contiguous() && key.is_contiguous() && value.is_contiguous() && blocks.is_contiguous() &&
              first.is_contiguous() && position.is_contiguous(), "member_attention: inputs must be contiguous");
  TORCH_CHECK(blocks.scalar_type() == torch::kLong && first.scalar_type() == torch::kLong &&
              position.scalar_type() == torch::kLong, "member_attention: blocks, first and position must be long");
  const int64_t H = query.size(1), D = query.size(2), Hkv = key.size(1), R = position.size(0);
  TORCH_CHECK(H % Hkv == 0 && first.size(0) == R + 1 && blocks.size(0) == R, "member_attention: shape mismatch");
  auto out = torch::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_cache.scalar_type(), "member_attention", [&] {
    attend<scalar_t>(query.data_ptr<float>(), key.data_ptr<float>(), value.data_ptr<float>(),
                     kv_cache.data_ptr<scalar_t>(), blocks.data_ptr<int64_t>(), first.data_ptr<int64_t>(),
                     position.data_ptr<int64_t>(), out.data_ptr<float>(), R, H, Hkv, D, block_size,
                     kv_cache.stride(0), kv_cache.stride(1), blocks.size(1), keys_major, values_major,
                     static_cast<float>(scale), window);
  });
  return out;
}
