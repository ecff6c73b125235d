// Adam with torch.optim.Adam's arithmetic (no weight decay), elementwise over one parameter array:
// m.lerp_(g, 1-b1); v = b2 v + (1-b2) g^2; denom = sqrt(v)/sqrt(bc2) + eps; p -= (m * lr/bc1) / denom.
// The caller passes step_size = lr/bc1 and bc2s = sqrt(bc2) (bc = 1 - beta^t).
#pragma once

#include "common.h"

namespace iis {

struct AdamConsts {
  float w1 = (float)(1.0 - 0.9), b2 = 0.999f, w2 = (float)(1.0 - 0.999), eps = 1e-8f;
};

inline void adam_update(float* __restrict p, float* __restrict m, float* __restrict v, const float* __restrict g,
                        int64_t n, float step_size, float bc2s) {
  const AdamConsts c;
  int64_t i = 0;
#if IIS_AVX2
  __m256 w1 = _mm256_set1_ps(c.w1), b2 = _mm256_set1_ps(c.b2), w2 = _mm256_set1_ps(c.w2), eps = _mm256_set1_ps(c.eps),
         ss = _mm256_set1_ps(step_size), bc = _mm256_set1_ps(bc2s);
  for (; i + 8 <= n; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i), mv = _mm256_loadu_ps(m + i), vv = _mm256_loadu_ps(v + i);
    mv = _mm256_add_ps(mv, _mm256_mul_ps(w1, _mm256_sub_ps(gv, mv)));
    vv = _mm256_add_ps(_mm256_mul_ps(vv, b2), _mm256_mul_ps(_mm256_mul_ps(w2, gv), gv));
    __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), bc), eps);
    __m256 pv = _mm256_sub_ps(_mm256_loadu_ps(p + i), _mm256_div_ps(_mm256_mul_ps(mv, ss), den));
    _mm256_storeu_ps(m + i, mv);
    _mm256_storeu_ps(v + i, vv);
    _mm256_storeu_ps(p + i, pv);
  }
#endif
  for (; i < n; ++i) {
    float gi = g[i];
    float mi = m[i] + c.w1 * (gi - m[i]);
    float vi = v[i] * c.b2 + (c.w2 * gi) * gi;
    float den = std::sqrt(vi) / bc2s + c.eps;
    p[i] = p[i] - (mi * step_size) / den;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace iis
