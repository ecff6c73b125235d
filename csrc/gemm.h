// Blocked fp32 GEMM (BLIS-style packing, 6x16 AVX2/FMA micro-kernel) and the small vector helpers the grid
// kernels share. No dependency beyond the C++ standard library and OpenMP.
//
// A matrix operand is described by a base pointer, a row stride and a column stride, plus optional index
// arrays that remap logical rows/columns to physical ones (used to read a batch x[idx] without gathering it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define IIS_AVX2 1
#else
#define IIS_AVX2 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace iis {

constexpr int MR = 6;
constexpr int NR = 16;
constexpr int KC = 256;
constexpr int MC_MAX = 144;
constexpr int NC = 4096;

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Logical element (i, p) lives at base[r(i) * rs + c(p) * cs] with r/c the optional index maps.
struct Mat {
  const float* base;
  int64_t rs, cs;
  const int64_t* ridx = nullptr;
  const int64_t* cidx = nullptr;
  inline int64_t roff(int64_t i) const { return (ridx ? ridx[i] : i) * rs; }
  inline int64_t coff(int64_t p) const { return (cidx ? cidx[p] : p) * cs; }
};

// 64-byte aligned float buffer that only grows (no page faults per call once warm).
struct Buf {
  float* p = nullptr;
  size_t n = 0;
  ~Buf() { std::free(p); }
  float* get(size_t want) {
    if (want > n) {
      std::free(p);
      size_t bytes = ((want * sizeof(float) + 63) / 64) * 64;
      p = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
      n = want;
    }
    return p;
  }
};

struct GemmWs {
  Buf a, b, c;
};

// ---- packing ----
// A block (mc x kc) -> panels of MR rows: dst[panel][p*MR + r]; rows past mc are zero.
inline void pack_a(const Mat& A, int64_t i0, int64_t p0, int mc, int kc, float* dst) {
  for (int ir = 0; ir < mc; ir += MR) {
    int mr = std::min(MR, mc - ir);
    float* d = dst + (int64_t)ir * kc;
    if (A.cs == 1 && !A.cidx) {
#if IIS_AVX2
      if (mr == MR) {  // 8 columns at a time: 6 row loads, an 8x8 transpose (rows 6, 7 zero), 8 overlapping stores
        static_assert(MR == 6, "the transposed pack assumes MR == 6");
        const float* s[MR];
        for (int r = 0; r < MR; ++r) s[r] = A.base + A.roff(i0 + ir + r) + p0;
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
          const float* s = A.base + A.roff(i0 + ir + r) + p0;
          for (int p = 0; p < kc; ++p) d[p * MR + r] = s[p];
        } else {
          for (int p = 0; p < kc; ++p) d[p * MR + r] = 0.f;
        }
      }
    } else if (A.rs == 1 && !A.ridx) {
#if IIS_AVX2
      if (mr == MR) {  // MR consecutive floats per p: one masked load, one 8-wide store (the 2 extra lanes are
                       // overwritten by the next p; the last lands in the 8 floats of slack after the buffer)
        const __m256i m6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
        static_assert(MR == 6, "the masked pack assumes MR == 6");
        for (int p = 0; p < kc; ++p)
          _mm256_storeu_ps(d + p * MR, _mm256_maskload_ps(A.base + A.coff(p0 + p) + i0 + ir, m6));
        continue;
      }
#endif
      for (int p = 0; p < kc; ++p) {
        const float* s = A.base + A.coff(p0 + p) + i0 + ir;
        int r = 0;
        for (; r < mr; ++r) d[p * MR + r] = s[r];
        for (; r < MR; ++r) d[p * MR + r] = 0.f;
      }
    } else {
      for (int p = 0; p < kc; ++p) {
        int64_t co = A.coff(p0 + p);
        int r = 0;
        for (; r < mr; ++r) d[p * MR + r] = A.base[A.roff(i0 + ir + r) + co];
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
    if (B.cs == 1 && !B.cidx) {
      for (int p = 0; p < kc; ++p) {
        const float* s = B.base + B.roff(p0 + p) + j0 + jr;
        int c = 0;
        if (nr == NR) {
          std::memcpy(d + p * NR, s, NR * sizeof(float));
          continue;
        }
        for (; c < nr; ++c) d[p * NR + c] = s[c];
        for (; c < NR; ++c) d[p * NR + c] = 0.f;
      }
    } else if (B.rs == 1 && !B.ridx) {
      for (int c = 0; c < NR; ++c) {
        if (c < nr) {
          const float* s = B.base + B.coff(j0 + jr + c) + p0;
          for (int p = 0; p < kc; ++p) d[p * NR + c] = s[p];
        } else {
          for (int p = 0; p < kc; ++p) d[p * NR + c] = 0.f;
        }
      }
    } else {
      for (int p = 0; p < kc; ++p) {
        int64_t ro = B.roff(p0 + p);
        int c = 0;
        for (; c < nr; ++c) d[p * NR + c] = B.base[ro + B.coff(j0 + jr + c)];
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

inline Mat sub_rows(const Mat& A, int64_t i0) {
  Mat s = A;
  if (s.ridx) s.ridx += i0; else s.base += i0 * s.rs;
  return s;
}
inline Mat sub_cols(const Mat& B, int64_t j0) {
  Mat s = B;
  if (s.cidx) s.cidx += j0; else s.base += j0 * s.cs;
  return s;
}

// Parallel GEMM: each thread computes its own rectangle of C (split along the longer side, in whole panels).
// wss must hold one workspace per thread. Call from outside a parallel region.
inline void gemm(int64_t m, int64_t n, int64_t k, const Mat& A, const Mat& B, float* C, int64_t ldc, bool accumulate,
                 std::vector<GemmWs>& wss) {
  int nt = std::min<int>(max_threads(), (int)wss.size());
  double work = (double)m * n * k;
  if (nt <= 1 || work < 2e6) {
    gemm_serial(m, n, k, A, B, C, ldc, accumulate, wss[0]);
    return;
  }
  int64_t mp = (m + MR - 1) / MR, np = (n + NR - 1) / NR;
  bool split_m = (m >= n) || np < nt;
  if (split_m && mp < nt) split_m = false;
#pragma omp parallel num_threads(nt)
  {
    int t = thread_id(), T = nt;
#ifdef _OPENMP
    T = omp_get_num_threads();
#endif
    if (split_m) {
      int64_t a = mp * t / T, b = mp * (t + 1) / T;
      int64_t i0 = a * MR, i1 = std::min(m, b * MR);
      if (i1 > i0) gemm_serial(i1 - i0, n, k, sub_rows(A, i0), B, C + i0 * ldc, ldc, accumulate, wss[t]);
    } else {
      int64_t a = np * t / T, b = np * (t + 1) / T;
      int64_t j0 = a * NR, j1 = std::min(n, b * NR);
      if (j1 > j0) gemm_serial(m, j1 - j0, k, A, sub_cols(B, j0), C + j0, ldc, accumulate, wss[t]);
    }
  }
}

// ---- vector helpers over a row of length n ----
#if IIS_AVX2
inline __m256i tail_mask(int r) {  // first r lanes on (0 <= r <= 8)
  alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - r));
}

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
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

// out[0:n] = (init ? init : 0)[0:n] + sum_e val[e] * src[idx[e] * ld + 0:n]   (a sparse row times a dense matrix)
inline void sparse_axpy_row(float* out, const float* init, const float* src, int64_t ld, const int32_t* idx,
                            const float* val, int ne, int n) {
#if IIS_AVX2
  int c = 0;
  for (; c + 32 <= n; c += 32) {
    __m256 a0, a1, a2, a3;
    if (init) {
      a0 = _mm256_loadu_ps(init + c); a1 = _mm256_loadu_ps(init + c + 8);
      a2 = _mm256_loadu_ps(init + c + 16); a3 = _mm256_loadu_ps(init + c + 24);
    } else {
      a0 = a1 = a2 = a3 = _mm256_setzero_ps();
    }
    int e = 0;
    for (; e + 2 <= ne; e += 2) {  // two entries per iteration: 8 independent FMAs in flight
      const float* s = src + (int64_t)idx[e] * ld + c;
      const float* u = src + (int64_t)idx[e + 1] * ld + c;
      __m256 z = _mm256_broadcast_ss(val + e), w = _mm256_broadcast_ss(val + e + 1);
      __m256 t0 = _mm256_mul_ps(w, _mm256_loadu_ps(u)), t1 = _mm256_mul_ps(w, _mm256_loadu_ps(u + 8));
      __m256 t2 = _mm256_mul_ps(w, _mm256_loadu_ps(u + 16)), t3 = _mm256_mul_ps(w, _mm256_loadu_ps(u + 24));
      t0 = _mm256_fmadd_ps(z, _mm256_loadu_ps(s), t0); t1 = _mm256_fmadd_ps(z, _mm256_loadu_ps(s + 8), t1);
      t2 = _mm256_fmadd_ps(z, _mm256_loadu_ps(s + 16), t2); t3 = _mm256_fmadd_ps(z, _mm256_loadu_ps(s + 24), t3);
      a0 = _mm256_add_ps(a0, t0); a1 = _mm256_add_ps(a1, t1); a2 = _mm256_add_ps(a2, t2); a3 = _mm256_add_ps(a3, t3);
    }
    for (; e < ne; ++e) {
      const float* s = src + (int64_t)idx[e] * ld + c;
      __m256 z = _mm256_broadcast_ss(val + e);
      a0 = _mm256_fmadd_ps(z, _mm256_loadu_ps(s), a0); a1 = _mm256_fmadd_ps(z, _mm256_loadu_ps(s + 8), a1);
      a2 = _mm256_fmadd_ps(z, _mm256_loadu_ps(s + 16), a2); a3 = _mm256_fmadd_ps(z, _mm256_loadu_ps(s + 24), a3);
    }
    _mm256_storeu_ps(out + c, a0); _mm256_storeu_ps(out + c + 8, a1);
    _mm256_storeu_ps(out + c + 16, a2); _mm256_storeu_ps(out + c + 24, a3);
  }
  for (; c < n; c += 8) {
    int r = std::min(8, n - c);
    __m256i mk = tail_mask(r);
    __m256 a0 = init ? _mm256_maskload_ps(init + c, mk) : _mm256_setzero_ps();
    for (int e = 0; e < ne; ++e) {
      const float* s = src + (int64_t)idx[e] * ld + c;
      a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(val + e), _mm256_maskload_ps(s, mk), a0);
    }
    _mm256_maskstore_ps(out + c, mk, a0);
  }
#else
  for (int c = 0; c < n; ++c) out[c] = init ? init[c] : 0.f;
  for (int e = 0; e < ne; ++e) {
    const float* s = src + (int64_t)idx[e] * ld;
    float z = val[e];
    for (int c = 0; c < n; ++c) out[c] += z * s[c];
  }
#endif
}

// out[e] = dot(g[0:n], src[idx[e] * ld + 0:n]) for every entry e.
inline void sparse_dots(float* out, const float* g, const float* src, int64_t ld, const int32_t* idx, int ne, int n) {
#if IIS_AVX2
  int e = 0;
  int nf = n & ~7;
  __m256i mk = tail_mask(n - nf);
  for (; e + 4 <= ne; e += 4) {
    const float* s0 = src + (int64_t)idx[e] * ld;
    const float* s1 = src + (int64_t)idx[e + 1] * ld;
    const float* s2 = src + (int64_t)idx[e + 2] * ld;
    const float* s3 = src + (int64_t)idx[e + 3] * ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int c = 0; c < nf; c += 8) {
      __m256 gv = _mm256_loadu_ps(g + c);
      a0 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(s0 + c), a0);
      a1 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(s1 + c), a1);
      a2 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(s2 + c), a2);
      a3 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(s3 + c), a3);
    }
    if (nf < n) {
      __m256 gv = _mm256_maskload_ps(g + nf, mk);
      a0 = _mm256_fmadd_ps(gv, _mm256_maskload_ps(s0 + nf, mk), a0);
      a1 = _mm256_fmadd_ps(gv, _mm256_maskload_ps(s1 + nf, mk), a1);
      a2 = _mm256_fmadd_ps(gv, _mm256_maskload_ps(s2 + nf, mk), a2);
      a3 = _mm256_fmadd_ps(gv, _mm256_maskload_ps(s3 + nf, mk), a3);
    }
    out[e] = hsum(a0); out[e + 1] = hsum(a1); out[e + 2] = hsum(a2); out[e + 3] = hsum(a3);
  }
  for (; e < ne; ++e) {
    const float* s0 = src + (int64_t)idx[e] * ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int c = 0;
    for (; c + 16 <= nf; c += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + c), _mm256_loadu_ps(s0 + c), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(g + c + 8), _mm256_loadu_ps(s0 + c + 8), a1);
    }
    for (; c < nf; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + c), _mm256_loadu_ps(s0 + c), a0);
    if (nf < n) a1 = _mm256_fmadd_ps(_mm256_maskload_ps(g + nf, mk), _mm256_maskload_ps(s0 + nf, mk), a1);
    out[e] = hsum(_mm256_add_ps(a0, a1));
  }
#else
  for (int e = 0; e < ne; ++e) {
    const float* s = src + (int64_t)idx[e] * ld;
    float a = 0.f;
    for (int c = 0; c < n; ++c) a += g[c] * s[c];
    out[e] = a;
  }
#endif
}

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
