// Per-row threshold of a sparse concept head (docs/spec.md §1.3), used by the wide and the narrow kernels alike:
//  * affine_abs: z = ahat * gamma + beta (two roundings, as torch) and |z| over a row padded to whole vectors;
//  * select_rth: the exact r-th smallest |z| (r = k + 1). One pass in the usual case: count the entries below a
//    window around the previous row's answer and compact the entries inside it; else counting passes with six
//    cuts each narrow the bracket, and the few candidates left are ranked exactly. Ties follow the spec: every
//    entry equal to the threshold is dropped (kept <=> |z| > threshold);
//  * mask_row / kept_indices: the kept entries of a row, as a masked row (dense heads) or as indices (sparse).
// Rows are M values padded to Mp = pad8(M) lanes: z = 0 and |z| = +inf there (never counted as <= a cut).
// The base build runs the same algorithm with scalar loops.
#pragma once

#include "common.h"

namespace iis {

// z = ah * g + be, az = |z| over M entries, pad lanes z = 0, az = +inf; ahp (optional) receives ah padded with
// zeros. z, az, ahp: Mp floats, 32-byte aligned. Returns max |z|.
inline float affine_abs(const float* ah, const float* g, const float* be, int M, float* ahp, float* z, float* az) {
  int j = 0;
#if IIS_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  for (; j + 8 <= M; j += 8) {
    __m256 a = _mm256_loadu_ps(ah + j);
    __m256 v = _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(g + j)), _mm256_loadu_ps(be + j));
    __m256 av = _mm256_andnot_ps(sign, v);
    if (ahp) _mm256_store_ps(ahp + j, a);
    _mm256_store_ps(z + j, v);
    _mm256_store_ps(az + j, av);
    mx = _mm256_max_ps(mx, av);
  }
  if (j < M) {
    __m256i mk = tail_mask(M - j);
    __m256 valid = _mm256_castsi256_ps(mk);
    __m256 a = _mm256_maskload_ps(ah + j, mk);
    __m256 v = _mm256_add_ps(_mm256_mul_ps(a, _mm256_maskload_ps(g + j, mk)), _mm256_maskload_ps(be + j, mk));
    __m256 av = _mm256_andnot_ps(sign, v);
    if (ahp) _mm256_store_ps(ahp + j, a);
    _mm256_store_ps(z + j, _mm256_and_ps(v, valid));
    _mm256_store_ps(az + j, _mm256_blendv_ps(_mm256_set1_ps(INFINITY), av, valid));
    mx = _mm256_max_ps(mx, _mm256_and_ps(av, valid));
  }
  return hmax(mx);
#else
  float mx = 0.f;
  for (; j < M; ++j) {
    const float a = ah[j], p = a * g[j], v = p + be[j];
    if (ahp) ahp[j] = a;
    z[j] = v;
    az[j] = std::fabs(v);
    mx = std::max(mx, az[j]);
  }
  for (; j < pad8(M); ++j) {
    if (ahp) ahp[j] = 0.f;
    z[j] = 0.f;
    az[j] = INFINITY;
  }
  return mx;
#endif
}

#if IIS_AVX2
// Left-packing of the lanes selected by an 8-bit mask: kCompress[m] lists the set bits of m, lowest first, as
// byte lane indices (the rest 0). Branch-free stream compaction: no per-bit loop, no mispredicted branches.
struct CompressTable {
  alignas(64) uint64_t idx[256];
  constexpr CompressTable() : idx{} {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      int n = 0;
      for (int b = 0; b < 8; ++b)
        if (m >> b & 1) v |= (uint64_t)b << (8 * n++);
      idx[m] = v;
    }
  }
};
inline constexpr CompressTable kCompress{};

inline __m256i compress_perm(unsigned m) {
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)kCompress.idx[m]));
}
#endif

namespace sel {

constexpr int NCUT = 6;
constexpr float kWindow = 1.5f;  // half-width of the one-pass window, in units of the row-to-row spread

// smallest of az[0:Mp]
inline float row_min(const float* az, int Mp) {
#if IIS_AVX2
  __m256 mn = _mm256_set1_ps(INFINITY);
  for (int j = 0; j < Mp; j += 8) mn = _mm256_min_ps(mn, _mm256_load_ps(az + j));
  return hmin(mn);
#else
  float mn = INFINITY;
  for (int j = 0; j < Mp; ++j) mn = std::min(mn, az[j]);
  return mn;
#endif
}

// cnt[q] = #{j : az[j] <= cut[q]} for six cuts in one pass
inline void count6(const float* az, int Mp, const float* cut, int* cnt) {
#if IIS_AVX2
  const __m256 t0 = _mm256_set1_ps(cut[0]), t1 = _mm256_set1_ps(cut[1]), t2 = _mm256_set1_ps(cut[2]),
               t3 = _mm256_set1_ps(cut[3]), t4 = _mm256_set1_ps(cut[4]), t5 = _mm256_set1_ps(cut[5]);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  for (int j = 0; j < Mp; j += 8) {
    __m256 v = _mm256_load_ps(az + j);
    a0 = _mm256_sub_epi32(a0, _mm256_castps_si256(_mm256_cmp_ps(v, t0, _CMP_LE_OQ)));
    a1 = _mm256_sub_epi32(a1, _mm256_castps_si256(_mm256_cmp_ps(v, t1, _CMP_LE_OQ)));
    a2 = _mm256_sub_epi32(a2, _mm256_castps_si256(_mm256_cmp_ps(v, t2, _CMP_LE_OQ)));
    a3 = _mm256_sub_epi32(a3, _mm256_castps_si256(_mm256_cmp_ps(v, t3, _CMP_LE_OQ)));
    a4 = _mm256_sub_epi32(a4, _mm256_castps_si256(_mm256_cmp_ps(v, t4, _CMP_LE_OQ)));
    a5 = _mm256_sub_epi32(a5, _mm256_castps_si256(_mm256_cmp_ps(v, t5, _CMP_LE_OQ)));
  }
  cnt[0] = hsum_epi32(a0); cnt[1] = hsum_epi32(a1); cnt[2] = hsum_epi32(a2);
  cnt[3] = hsum_epi32(a3); cnt[4] = hsum_epi32(a4); cnt[5] = hsum_epi32(a5);
#else
  for (int q = 0; q < NCUT; ++q) {  // one pass per cut: each a loop the compiler vectorises
    const float t = cut[q];
    int c = 0;
    for (int j = 0; j < Mp; ++j) c += az[j] <= t;
    cnt[q] = c;
  }
#endif
}

// The values of az[0:Mp] in (a, b] into cand (Mp + 8 floats), in order; *below = #(az <= a). Returns their number.
inline int gather_window(const float* az, int Mp, float a, float b, float* cand, int* below) {
  int nc = 0;
#if IIS_AVX2
  const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
  __m256i cl = _mm256_setzero_si256();
  for (int j = 0; j < Mp; j += 8) {
    __m256 v = _mm256_load_ps(az + j);
    __m256 le_a = _mm256_cmp_ps(v, av, _CMP_LE_OQ);
    cl = _mm256_sub_epi32(cl, _mm256_castps_si256(le_a));
    unsigned m = (unsigned)_mm256_movemask_ps(_mm256_andnot_ps(le_a, _mm256_cmp_ps(v, bv, _CMP_LE_OQ)));
    _mm256_storeu_ps(cand + nc, _mm256_permutevar8x32_ps(v, compress_perm(m)));
    nc += __builtin_popcount(m);
  }
  if (below) *below = hsum_epi32(cl);
#else
  if (below) {  // a loop the compiler vectorises
    int c = 0;
    for (int j = 0; j < Mp; ++j) c += az[j] <= a;
    *below = c;
  }
  for (int j = 0; j < Mp; ++j) {  // branch-free
    cand[nc] = az[j];
    nc += (az[j] > a) & (az[j] <= b);
  }
#endif
  return nc;
}

// The previous row's answer and the typical row-to-row change of it: where the next row's first cuts go.
struct State {
  float prev = -1.f, spread = 0.f;
};

// the want-th smallest (0-based) of cand[0:nc]; records it as the previous answer
inline float finish(State& st, float* cand, int nc, int want) {
  float v;
#if IIS_AVX2
  if (nc <= 32) {  // rank by vector compares: the value with #(< v) <= want < #(<= v); no data-dependent swaps
    const int nv = (nc + 7) / 8;
    for (int j = nc; j < 8 * nv; ++j) cand[j] = INFINITY;
    v = cand[0];
    for (int i = 0; i < nc; ++i) {
      const __m256 b = _mm256_set1_ps(cand[i]);
      int lt = 0, le = 0;
      for (int u = 0; u < nv; ++u) {
        const __m256 c = _mm256_loadu_ps(cand + 8 * u);
        lt += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(c, b, _CMP_LT_OQ)));
        le += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(c, b, _CMP_LE_OQ)));
      }
      if (lt <= want && want < le) {
        v = cand[i];
        break;
      }
    }
  } else
#endif
  {
    std::nth_element(cand, cand + want, cand + nc);
    v = cand[want];
  }
  if (st.prev >= 0.f) {
    const float d = std::fabs(v - st.prev);
    st.spread = st.spread > 0.f ? 0.875f * st.spread + 0.125f * d : d;
  }
  st.prev = v;
  return v;
}

}  // namespace sel

using SelState = sel::State;

// Exact r-th smallest (1-based, 1 <= r <= M) of the M values az[0:M] (all >= 0; lanes M..Mp-1 are +inf),
// amax = their maximum. st carries the previous row's answer (one State per head and pass over rows).
// cand: scratch of Mp + 8 floats.
inline float select_rth(const float* az, int Mp, int M, int r, float amax, SelState& st, float* cand) {
  using namespace sel;
  constexpr int DONE = 12;  // gather once the bracket holds at most this many values
  if (r >= M) return amax;  // r = M drops everything
  if (r == 1) return row_min(az, Mp);  // s = 0: the minimum (pad lanes are +inf: they never win)
  float lo = -1.f, hi = amax;
  int clo = 0, chi = M;  // invariant: #(az <= lo) = clo < r <= chi = #(az <= hi)
  if (st.prev >= 0.f && st.spread > 0.f) {
    // Usual case, one pass: count az <= a and gather the values in (a, b], a window around the previous row's
    // answer; done if the r-th smallest is among them, else the window still narrows the bracket.
    const float a = st.prev - kWindow * st.spread, b = st.prev + kWindow * st.spread;
    int c;
    const int nc = gather_window(az, Mp, a, b, cand, &c);
    if (c < r && r <= c + nc) return finish(st, cand, nc, r - c - 1);
    if (c >= r) {
      if (a > lo && a < hi) { hi = a; chi = c; }
    } else if (b > lo && b < hi) {
      lo = b;
      clo = c + nc;
    }
  }
  float cut[NCUT];
  int cnt[NCUT];
  for (int pass = 0; pass < 10 && chi - clo > DONE; ++pass) {  // evenly spaced cuts inside the bracket
    const float base = std::max(lo, 0.f), width = hi - base;
    for (int q = 0; q < NCUT; ++q) cut[q] = base + width * ((float)(q + 1) / (float)(NCUT + 1));
    count6(az, Mp, cut, cnt);
    const int before = chi - clo;
    for (int q = 0; q < NCUT; ++q) {  // cuts ascend, counts are monotone
      if (!(cut[q] > lo && cut[q] < hi)) continue;
      if (cnt[q] < r) {
        lo = cut[q];
        clo = cnt[q];
      } else {
        hi = cut[q];
        chi = cnt[q];
        break;
      }
    }
    if (pass > 0 && chi - clo == before) break;  // no cut fits strictly inside (lo, hi]: it holds one value
  }
  const int nc = gather_window(az, Mp, lo, hi, cand, nullptr);
  if (nc == 0) return hi;  // only with non-finite inputs
  return finish(st, cand, nc, std::min(std::max(r - clo - 1, 0), nc - 1));
}

// zm[j] = 0 where az[j] <= thr, in place over Mp lanes; returns how many of the first M entries are kept
inline int mask_row(float* zm, const float* az, float thr, int M, int Mp) {
  int kept = 0;
#if IIS_AVX2
  const __m256 tv = _mm256_set1_ps(thr);
  for (int j = 0; j < Mp; j += 8) {
    __m256 k = _mm256_cmp_ps(_mm256_load_ps(az + j), tv, _CMP_GT_OQ);
    kept += __builtin_popcount((unsigned)_mm256_movemask_ps(k));
    _mm256_store_ps(zm + j, _mm256_and_ps(k, _mm256_load_ps(zm + j)));
  }
#else
  for (int j = 0; j < Mp; ++j) {
    const bool keep = az[j] > thr;
    kept += keep;
    zm[j] = keep ? zm[j] : 0.f;
  }
#endif
  return kept - (Mp - M);  // pad lanes (+inf) always pass the compare
}

// indices of kept entries (az > thr, j < M), ascending, into kidx (room for Mp + 8); returns their number
inline int kept_indices(const float* az, float thr, int M, int Mp, int32_t* kidx) {
  int n = 0;
#if IIS_AVX2
  const __m256 tv = _mm256_set1_ps(thr);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int j = 0; j < Mp; j += 8) {
    unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(az + j), tv, _CMP_GT_OQ));
    if (j + 8 > M) m &= (1u << (M - j)) - 1u;
    __m256i ids = _mm256_add_epi32(lane, _mm256_set1_epi32(j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(kidx + n), _mm256_permutevar8x32_epi32(ids, compress_perm(m)));
    n += __builtin_popcount(m);
  }
#else
  (void)Mp;
  for (int j = 0; j < M; ++j) {  // branch-free
    kidx[n] = j;
    n += az[j] > thr;
  }
#endif
  return n;
}

}  // namespace iis
