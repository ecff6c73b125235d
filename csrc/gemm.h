// Blocked fp32 GEMM: BLIS-style packing, 6x16 AVX2/FMA micro-kernel (scalar in the base build), KC=256, MC<=144.
// Single-threaded: callers split the work across threads (the probes by rows or columns in grid.h, the
// projection by row blocks in project.h; a concept head runs on one thread). Each element of C is summed over
// k in the same order whatever the split, so results do not depend on the thread count.
#pragma once

#include "common.h"

namespace iis {

constexpr int MR = 6;
constexpr int NR = 16;
constexpr int KC = 256;
constexpr int MC_MAX = 144;
constexpr int NC = 4096;

// A matrix operand: element (i, p) lives at base[i * rs + p * cs] (rs = 1 or cs = 1 reads a transpose in place).
struct Mat {
  const float* base;
  int64_t rs, cs;
};

struct GemmWs {
  Buf a, b;
};

// ---- packing ----
// A block (mc x kc) -> panels of MR rows: dst[panel][p*MR + r]; rows past mc are zero.
inline void pack_a(const Mat& A, int64_t i0, int64_t p0, int mc, int kc, float* dst) {
  for (int ir = 0; ir < mc; ir += MR) {
    int mr = std::min(MR, mc - ir);
    float* d = dst + (int64_t)ir * kc;
    if (A.cs == 1) {
#if IIS_AVX2
      if (mr == MR) {  // 8 columns at a time: 6 row loads, an 8x8 transpose (rows 6, 7 zero), 8 overlapping stores
        static_assert(MR == 6, "the transposed pack assumes MR == 6");
        const float* s[MR];
        for (int r = 0; r < MR; ++r) s[r] = A.base + A.rs * (i0 + ir + r) + p0;
        const __m256 z = _mm256_setzero_ps();
        int p = 0;
        for (; p + 8 <= kc; p += 8) {
          __m256 t0 = _mm256_unpacklo_ps(_mm256_loadu_ps(s[0] + p), _mm256_loadu_ps(s[1] + p));
          __m256 t1 = _mm256_unpackhi_ps(_mm256_loadu_ps(s[0] + p), _mm256_loadu_ps(s[1] + p));
          __m256 t2 = _mm256_unpacklo_ps(_mm256_loadu_ps(s[2] + p), _mm256_loadu_ps(s[3] + p));
          __m256 t3 = _mm256_unpackhi_ps(_mm256_loadu_ps(s[2] + p), _mm256_loadu_ps(s[3] + p));
          __m256 t4 = _mm256_unpacklo_ps(_mm256_loadu_ps(s[4] + p), _mm256_loadu_ps(s[5] + p));
          __m256 t5 = _mm256_unpackhi_ps(_mm256_loadu_ps(s[4] + p), _mm256_loadu_ps(s[5] + p));
          __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
          __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
          __m256 u4 = _mm256_shuffle_ps(t4, z, 0x44), u5 = _mm256_shuffle_ps(t4, z, 0xEE);
          __m256 u6 = _mm256_shuffle_ps(t5, z, 0x44), u7 = _mm256_shuffle_ps(t5, z, 0xEE);
          float* o = d + p * MR;  // column q lands at o + 6q; lanes 6, 7 are overwritten by column q + 1
          _mm256_storeu_ps(o + 0 * MR, _mm256_permute2f128_ps(u0, u4, 0x20));
          _mm256_storeu_ps(o + 1 * MR, _mm256_permute2f128_ps(u1, u5, 0x20));
          _mm256_storeu_ps(o + 2 * MR, _mm256_permute2f128_ps(u2, u6, 0x20));
          _mm256_storeu_ps(o + 3 * MR, _mm256_permute2f128_ps(u3, u7, 0x20));
          _mm256_storeu_ps(o + 4 * MR, _mm256_permute2f128_ps(u0, u4, 0x31));
          _mm256_storeu_ps(o + 5 * MR, _mm256_permute2f128_ps(u1, u5, 0x31));
          _mm256_storeu_ps(o + 6 * MR, _mm256_permute2f128_ps(u2, u6, 0x31));
          _mm256_storeu_ps(o + 7 * MR, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        for (; p < kc; ++p)
          for (int r = 0; r < MR; ++r) d[p * MR + r] = s[r][p];
        continue;
      }
#endif
      for (int r = 0; r < MR; ++r) {
        if (r < mr) {
          const float* s = A.base + A.rs * (i0 + ir + r) + p0;
          for (int p = 0; p < kc; ++p) d[p * MR + r] = s[p];
        } else {
          for (int p = 0; p < kc; ++p) d[p * MR + r] = 0.f;
        }
      }
    } else if (A.rs == 1) {
#if IIS_AVX2
      if (mr == MR) {  // MR consecutive floats per p: one masked load, one 8-wide store (the 2 extra lanes are
                       // overwritten by the next p; the last lands in the 8 floats of slack after the buffer)
        const __m256i m6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
        static_assert(MR == 6, "the masked pack assumes MR == 6");
        for (int p = 0; p < kc; ++p)
          _mm256_storeu_ps(d + p * MR, _mm256_maskload_ps(A.base + A.cs * (p0 + p) + i0 + ir, m6));
        continue;
      }
#endif
      for (int p = 0; p < kc; ++p) {
        const float* s = A.base + A.cs * (p0 + p) + i0 + ir;
        int r = 0;
        for (; r < mr; ++r) d[p * MR + r] = s[r];
        for (; r < MR; ++r) d[p * MR + r] = 0.f;
      }
    } else {
      for (int p = 0; p < kc; ++p) {
        int64_t co = A.cs * (p0 + p);
        int r = 0;
        for (; r < mr; ++r) d[p * MR + r] = A.base[A.rs * (i0 + ir + r) + co];
        for (; r < MR; ++r) d[p * MR + r] = 0.f;
      }
    }
  }
}

// B block (kc x nc) -> panels of NR columns: dst[panel][p*NR + c]; columns past nc are zero.
inline void pack_b(const Mat& B, int64_t p0, int64_t j0, int kc, int nc, float* dst) {
  for (int jr = 0; jr < nc; jr += NR) {
    int nr = std::min(NR, nc - jr);
    float* d = dst + (int64_t)jr * kc;
    if (B.cs == 1) {
      for (int p = 0; p < kc; ++p) {
        const float* s = B.base + B.rs * (p0 + p) + j0 + jr;
        int c = 0;
        if (nr == NR) {
          std::memcpy(d + p * NR, s, NR * sizeof(float));
          continue;
        }
        for (; c < nr; ++c) d[p * NR + c] = s[c];
        for (; c < NR; ++c) d[p * NR + c] = 0.f;
      }
    } else if (B.rs == 1) {
      for (int c = 0; c < NR; ++c) {
        if (c < nr) {
          const float* s = B.base + B.cs * (j0 + jr + c) + p0;
          for (int p = 0; p < kc; ++p) d[p * NR + c] = s[p];
        } else {
          for (int p = 0; p < kc; ++p) d[p * NR + c] = 0.f;
        }
      }
    } else {
      for (int p = 0; p < kc; ++p) {
        int64_t ro = B.rs * (p0 + p);
        int c = 0;
        for (; c < nr; ++c) d[p * NR + c] = B.base[ro + B.cs * (j0 + jr + c)];
        for (; c < NR; ++c) d[p * NR + c] = 0.f;
      }
    }
  }
}

// ---- micro-kernel: C[mr x nr] (+)= Ap[kc x MR]^T-panel * Bp[kc x NR]-panel ----
inline void ukernel(int kc, const float* __restrict Ap, const float* __restrict Bp, float* C, int64_t ldc, int mr,
                    int nr, bool accumulate) {
#if IIS_AVX2
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(),
         c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(),
         c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int p = 0; p < kc; ++p) {
    __m256 b0 = _mm256_load_ps(Bp), b1 = _mm256_load_ps(Bp + 8);
    __m256 a;
    a = _mm256_broadcast_ss(Ap + 0); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(Ap + 1); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(Ap + 2); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(Ap + 3); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(Ap + 4); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(Ap + 5); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    Ap += MR;
    Bp += NR;
  }
  alignas(32) float t[MR * NR];
  _mm256_store_ps(t + 0, c00); _mm256_store_ps(t + 8, c01);
  _mm256_store_ps(t + 16, c10); _mm256_store_ps(t + 24, c11);
  _mm256_store_ps(t + 32, c20); _mm256_store_ps(t + 40, c21);
  _mm256_store_ps(t + 48, c30); _mm256_store_ps(t + 56, c31);
  _mm256_store_ps(t + 64, c40); _mm256_store_ps(t + 72, c41);
  _mm256_store_ps(t + 80, c50); _mm256_store_ps(t + 88, c51);
  if (mr == MR && nr == NR) {
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc;
      __m256 x0 = _mm256_load_ps(t + r * NR), x1 = _mm256_load_ps(t + r * NR + 8);
      if (accumulate) {
        x0 = _mm256_add_ps(x0, _mm256_loadu_ps(c));
        x1 = _mm256_add_ps(x1, _mm256_loadu_ps(c + 8));
      }
      _mm256_storeu_ps(c, x0);
      _mm256_storeu_ps(c + 8, x1);
    }
    return;
  }
#else
  float t[MR * NR] = {0};
  for (int p = 0; p < kc; ++p)
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) t[r * NR + c] += Ap[p * MR + r] * Bp[p * NR + c];
#endif
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < nr; ++c) {
      float v = t[r * NR + c];
      C[r * ldc + c] = accumulate ? C[r * ldc + c] + v : v;
    }
}

// Serial C[m x n] = (accumulate ? C : 0) + A[m x k] * B[k x n]  (C row-major with leading dim ldc).
inline void gemm_serial(int64_t m, int64_t n, int64_t k, const Mat& A, const Mat& B, float* C, int64_t ldc,
                        bool accumulate, GemmWs& ws) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::memset(C + i * ldc, 0, n * sizeof(float));
    return;
  }
  int mc_max = (int)std::min<int64_t>(MC_MAX, ((m + MR - 1) / MR) * MR);
  int nc_max = (int)std::min<int64_t>(NC, ((n + NR - 1) / NR) * NR);
  int kc_max = (int)std::min<int64_t>(KC, k);
  float* Ap = ws.a.get((size_t)mc_max * kc_max + 8);  // + slack for pack_a's 8-wide stores
  float* Bp = ws.b.get((size_t)nc_max * kc_max);
  for (int64_t jc = 0; jc < n; jc += NC) {
    int nc = (int)std::min<int64_t>(NC, n - jc);
    for (int64_t pc = 0; pc < k; pc += KC) {
      int kc = (int)std::min<int64_t>(KC, k - pc);
      bool acc = accumulate || pc > 0;
      pack_b(B, pc, jc, kc, nc, Bp);
      for (int64_t ic = 0; ic < m; ic += mc_max) {
        int mc = (int)std::min<int64_t>(mc_max, m - ic);
        pack_a(A, ic, pc, mc, kc, Ap);
        for (int jr = 0; jr < nc; jr += NR) {
          int nr = std::min(NR, nc - jr);
          for (int ir = 0; ir < mc; ir += MR) {
            int mr = std::min(MR, mc - ir);
            ukernel(kc, Ap + (int64_t)ir * kc, Bp + (int64_t)jr * kc, C + (ic + ir) * ldc + jc + jr, ldc, mr, nr, acc);
          }
        }
      }
    }
  }
}

}  // namespace iis
