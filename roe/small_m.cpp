// y[M, N] = x[M, K] @ w[N, K]^T for a few rows (M <= 8), fp32, AVX2 + FMA; see roe/kernels.py.
// Each weight row is loaded once and multiplied with every input row; C accumulators per row keep
// at least 8 independent FMA chains in flight. Rows go in blocks of 8, 4, 2 and 1.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

template <int M, int C>
static void block(const float* X, const float* W, float* Y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = W + n * K;
    __m256 acc[M][C];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < C; ++c) acc[m][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8 * C)
      for (int c = 0; c < C; ++c) {
        __m256 w = _mm256_loadu_ps(wr + k + 8 * c);
        for (int m = 0; m < M; ++m)
          acc[m][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + m * K + k + 8 * c), acc[m][c]);
      }
    for (int m = 0; m < M; ++m) {
      __m256 s = acc[m][0];
      for (int c = 1; c < C; ++c) s = _mm256_add_ps(s, acc[m][c]);
      Y[m * N + n] = hsum(s);
    }
  }
}

torch::Tensor small_m_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat && w.dtype() == torch::kFloat, "fp32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.dim() == 2 && w.dim() == 2, "contiguous 2-D inputs");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 32 == 0 && M >= 1 && M <= 8, "K a multiple of 32, 1 <= M <= 8");
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    // the output is row-major [M, N]: a block of rows starting at m writes Y + m * N
    if (M - m >= 8) { block<8, 1>(X + m * K, W, Y + m * N, K, N, n0, n1); m += 8; }
    if (M - m >= 4) { block<4, 2>(X + m * K, W, Y + m * N, K, N, n0, n1); m += 4; }
    if (M - m >= 2) { block<2, 4>(X + m * K, W, Y + m * N, K, N, n0, n1); m += 2; }
    if (M - m >= 1) { block<1, 4>(X + m * K, W, Y + m * N, K, N, n0, n1); }
  });
  return y;
}
