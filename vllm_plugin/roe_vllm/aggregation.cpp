// Each RoE request's log mean_k softmax(logits_k) over its K members, with no [rows, V] probability tensor; see
// roe_vllm/aggregation.py (``log_mean``, the PyTorch form it must match).
//
//   sum[r]  = softmax(logits[clean[r]]) + sum over m in first[r] .. first[r + 1] - 1 of softmax(logits[N + m])
//   mean[r] = log(sum[r] / K_r),   K_r = first[r + 1] - first[r] + 1
//
// Per row: the max, then exp(x - max) into a scratch row while summing it, then sum[r] += scratch / total. Member
// rows are contiguous per request (roe_vllm/members.py); the clean row is added first, then the members in order.
// A request with a token whose sum is 0 (it underflows in every member) is flagged for aggregation.py's fallback.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "avx2_exp.h"

// exp of 8 floats: avx2_exp.h's polynomial where x >= -87.3 (a normal result); lanes below that, -inf and NaN take std::exp: denormals, exact 0 and NaN come out as PyTorch's softmax gives them,
// so a token that underflows in every member still sums to 0 (aggregation.py's stable fallback).
static inline __m256 exp8_or_scalar(__m256 x) {
  const int outside = _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_NGE_UQ));
  __m256 e = exp8_in_range(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)));
  if (outside) {
    alignas(32) float in[8], got[8];
    _mm256_store_ps(in, x);
    _mm256_store_ps(got, e);
    for (int c = 0; c < 8; ++c)
      if (outside & (1 << c)) got[c] = std::exp(in[c]);
    e = _mm256_load_ps(got);
  }
  return e;
}

static inline float lanes_sum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float total = 0.f;
  for (int c = 0; c < 8; ++c) total += lanes[c];
  return total;
}

// sum[0 .. V) = softmax(row) (first) or += softmax(row); scratch holds V floats.
static void add_softmax(const float* row, float* sum, float* scratch, int64_t V, bool first) {
  __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + v));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float top = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < 8; ++c) top = std::max(top, lanes[c]);
  for (; v < V; ++v) top = std::max(top, row[v]);
  const __m256 top_8 = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  for (v = 0; v + 8 <= V; v += 8) {
    const __m256 e = exp8_or_scalar(_mm256_sub_ps(_mm256_loadu_ps(row + v), top_8));
    _mm256_storeu_ps(scratch + v, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = lanes_sum(total8);
  for (; v < V; ++v) total += (scratch[v] = std::exp(row[v] - top));
  const float inverse = 1.f / total;
  const __m256 inverse8 = _mm256_set1_ps(inverse);
  for (v = 0; v + 8 <= V; v += 8) {
    const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(scratch + v), inverse8);
    _mm256_storeu_ps(sum + v, first ? p : _mm256_add_ps(_mm256_loadu_ps(sum + v), p));
  }
  for (; v < V; ++v) sum[v] = first ? scratch[v] * inverse : sum[v] + scratch[v] * inverse;
}

// log of 8 floats (Cephes' logf polynomial, as in avx_mathfun: about 1 ulp) for normal positive x. Lanes below the
// smallest normal float (0, denormals) take std::log: 0 gives -inf, as PyTorch's log does.
static inline __m256 log8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  __m256i exponent = _mm256_srli_epi32(_mm256_castps_si256(x), 23);
  x = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(~0x7f800000))), _mm256_set1_ps(0.5f));
  __m256 e = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(exponent, _mm256_set1_epi32(0x7f))), one);
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OS);
  const __m256 low = _mm256_and_ps(x, small);
  x = _mm256_sub_ps(x, one);
  e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
  x = _mm256_add_ps(x, low);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(x, y));
}

// row[0 .. V) = log(row / K) in place; whether some token's sum is 0.
static bool log_mean_row(float* row, int64_t V, float K) {
  const __m256 K8 = _mm256_set1_ps(K), smallest = _mm256_set1_ps(std::numeric_limits<float>::min());
  bool zero = false;
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) {
    const __m256 sum = _mm256_loadu_ps(row + v);
    const __m256 mean = _mm256_div_ps(sum, K8);
    const int outside = _mm256_movemask_ps(_mm256_cmp_ps(mean, smallest, _CMP_NGE_UQ));
    _mm256_storeu_ps(row + v, log8(_mm256_max_ps(mean, smallest)));
    if (outside) {
      alignas(32) float got[8];
      _mm256_store_ps(got, mean);
      for (int c = 0; c < 8; ++c)
        if (outside & (1 << c)) {
          zero |= got[c] == 0.f;
          row[v + c] = std::log(got[c]);
        }
    }
  }
  for (; v < V; ++v) {
    zero |= row[v] == 0.f;
    row[v] = std::log(row[v] / K);
  }
  return zero;
}

// logits [N + M, V] fp32 contiguous: the N clean rows, then the member rows; clean [R] the clean row of each request;
// first [R + 1] its member rows (offsets from row N). Returns (mean [R, V]: each request's log mean probabilities,
// underflow [R]: some token's probability is 0 in every member).
std::vector<torch::Tensor> log_mean(torch::Tensor logits, torch::Tensor clean, torch::Tensor first, int64_t rows) {
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.dim() == 2 && logits.is_contiguous(),
              "log_mean: logits must be a contiguous float32 matrix");
  TORCH_CHECK(clean.scalar_type() == torch::kLong && first.scalar_type() == torch::kLong && clean.is_contiguous() &&
              first.is_contiguous() && first.size(0) == clean.size(0) + 1, "log_mean: clean [R], first [R + 1] long");
  const int64_t R = clean.size(0), V = logits.size(1), Y = logits.size(0);
  const int64_t* clean_R = clean.data_ptr<int64_t>();
  const int64_t* first_R = first.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(clean_R[r] >= 0 && clean_R[r] < rows && first_R[r] >= 0 && first_R[r] <= first_R[r + 1] &&
                rows + first_R[r + 1] <= Y, "log_mean: a request's rows lie outside the logits");
  auto mean = torch::empty({R, V}, logits.options());
  auto underflow = torch::zeros({R}, torch::kBool);
  const float* logits_YV = logits.data_ptr<float>();
  float* mean_RV = mean.data_ptr<float>();
  bool* underflow_R = underflow.data_ptr<bool>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(V);
    for (int64_t r = begin; r < end; ++r) {
      add_softmax(logits_YV + clean_R[r] * V, mean_RV + r * V, scratch.data(), V, true);
      for (int64_t m = first_R[r]; m < first_R[r + 1]; ++m)
        add_softmax(logits_YV + (rows + m) * V, mean_RV + r * V, scratch.data(), V, false);
      underflow_R[r] = log_mean_row(mean_RV + r * V, V, static_cast<float>(first_R[r + 1] - first_R[r] + 1));
    }
  });
  return {mean, underflow};
}
