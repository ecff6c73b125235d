// The projection every concept head shares, once per split: ahat = LayerNorm(x C^T) without affine.
#pragma once

#include "gemm.h"

namespace iis {

// out [N, M] = LayerNorm(x [N, D] . C [M, D]^T) over each row (eps 1e-5, no affine). Threads take blocks of rows:
// a block's GEMM, then its LayerNorm while the block is still in cache.
inline void project(const float* x, const float* C, float* out, int64_t N, int64_t D, int64_t M) {
  constexpr float LN_EPS = 1e-5f;
  constexpr int64_t RB = 96 * MR;  // rows per block
  const int nt = std::max(1, max_threads());
  std::vector<GemmWs> wss(nt);
  const int64_t nblk = (N + RB - 1) / RB;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t r0 = blk * RB, n = std::min(RB, N - r0);
    gemm_serial(n, M, D, Mat{x + r0 * D, D, 1}, Mat{C, 1, D}, out + r0 * M, M, false, wss[thread_id()]);
    for (int64_t i = r0; i < r0 + n; ++i) {
      float* a = out + i * M;
      double s = 0;
      for (int64_t j = 0; j < M; ++j) s += a[j];
      float mean = (float)(s / (double)M);
      double q = 0;
      for (int64_t j = 0; j < M; ++j) {
        double d = (double)a[j] - (double)mean;
        q += d * d;
      }
      float rstd = 1.0f / std::sqrt((float)(q / (double)M) + LN_EPS);
      for (int64_t j = 0; j < M; ++j) a[j] = (a[j] - mean) * rstd;
    }
  }
}

}  // namespace iis
