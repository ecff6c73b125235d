// Row helpers shared by the probes and both concept-head kernels: softmax cross-entropy with its gradient in
// place, the first argmax, a row sum.
#pragma once

#include "common.h"

namespace iis {

#if IIS_AVX2
// Cephes-style expf, |rel err| ~ 2e-7 on the range used (x <= 0 after max subtraction).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_add_epi32(n, _mm256_set1_epi32(127));
  n = _mm256_slli_epi32(n, 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif

// In place: row <- softmax(row + bias) - onehot(y), times scale. Returns the row's cross-entropy.
inline float softmax_ce_row(float* row, const float* bias, int n, int64_t y, float scale) {
#if IIS_AVX2
  int nf = n & ~7;
  __m256i mk = tail_mask(n - nf);
  __m256 mx = _mm256_set1_ps(-INFINITY);
  for (int c = 0; c < nf; c += 8) {
    __m256 v = _mm256_loadu_ps(row + c);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + c));
    _mm256_storeu_ps(row + c, v);
    mx = _mm256_max_ps(mx, v);
  }
  float m = -INFINITY;
  {
    alignas(32) float t[8];
    _mm256_store_ps(t, mx);
    for (int i = 0; i < 8; ++i) m = std::max(m, t[i]);
  }
  for (int c = nf; c < n; ++c) {
    if (bias) row[c] += bias[c];
    m = std::max(m, row[c]);
  }
  float ly = row[y] - m;
  __m256 mv = _mm256_set1_ps(m), sv = _mm256_setzero_ps();
  for (int c = 0; c < nf; c += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + c), mv));
    _mm256_storeu_ps(row + c, e);
    sv = _mm256_add_ps(sv, e);
  }
  if (nf < n) {
    __m256 v = _mm256_sub_ps(_mm256_maskload_ps(row + nf, mk), mv);
    __m256 e = _mm256_and_ps(exp256(v), _mm256_castsi256_ps(mk));
    _mm256_maskstore_ps(row + nf, mk, e);
    sv = _mm256_add_ps(sv, e);
  }
  float s = hsum(sv);
  float py = row[y] / s;
  float loss = std::log(s) - ly;
  __m256 f = _mm256_set1_ps(scale / s);
  for (int c = 0; c < nf; c += 8) _mm256_storeu_ps(row + c, _mm256_mul_ps(_mm256_loadu_ps(row + c), f));
  if (nf < n) _mm256_maskstore_ps(row + nf, mk, _mm256_mul_ps(_mm256_maskload_ps(row + nf, mk), f));
  row[y] = (py - 1.0f) * scale;
  return loss;
#else
  float m = -INFINITY;
  for (int c = 0; c < n; ++c) {
    if (bias) row[c] += bias[c];
    m = std::max(m, row[c]);
  }
  float ly = row[y] - m;
  float s = 0.f;
  for (int c = 0; c < n; ++c) {
    row[c] = std::exp(row[c] - m);
    s += row[c];
  }
  float py = row[y] / s;
  for (int c = 0; c < n; ++c) row[c] *= scale / s;
  row[y] = (py - 1.0f) * scale;
  return std::log(s) - ly;
#endif
}

// dst[0:n] += src[0:n]
inline void add_row(float* dst, const float* src, int n) {
  int c = 0;
#if IIS_AVX2
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(dst + c, _mm256_add_ps(_mm256_loadu_ps(dst + c), _mm256_loadu_ps(src + c)));
#endif
  for (; c < n; ++c) dst[c] += src[c];
}

// argmax (first maximum) of row + bias
inline int64_t argmax_row(const float* row, const float* bias, int n) {
  int64_t best = 0;
  float bv = -INFINITY;
  for (int c = 0; c < n; ++c) {
    float v = bias ? row[c] + bias[c] : row[c];
    if (c == 0 || v > bv) { bv = v; best = c; }
  }
  return best;
}

}  // namespace iis
