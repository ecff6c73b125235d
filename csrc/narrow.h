// Narrow concept heads (K <= 16 classes, AVX2 build): one head's whole batch step, and its evaluation, without
// GEMM packing or CSR building. With K this small the wide kernels (wide.h: GEMMs with a 16-wide micro-kernel,
// a CSR of the kept entries, scalar sparse loops) spend their time on bookkeeping, not arithmetic. Here, after
// the per-row affine and threshold of select.h:
//
//  * dense heads (many entries kept): masked z of a block of rows in [n, Mp] scratch; logits vectorised over the
//    concept axis against W transposed ([K, Mp]); dW, dz, dgamma, dbeta vectorised over the concept axis with
//    the row loop innermost, so every accumulator stays in a register for the whole block.
//  * sparse heads (few kept): per row, the kept indices (select.h), logits as a sum of kept rows of W (padded
//    to 16 lanes), and the backward on the kept entries only.
//
// Everything is templated on K (1..16) so that every loop over classes unrolls into registers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "head.h"
#include "rows.h"
#include "select.h"

#if IIS_AVX2
namespace iis {
namespace narrow {

constexpr int KMAX = 16;

// Per-thread scratch of one narrow head.
struct Ws {
  Buf wt, w16, b16, zm, ah, z, az, lg, dwt, dw16, dg, dbe, cand;
  std::vector<int32_t> kidx;
};

// ------------------------------------------------------------------------------------------------------------
// dense blocks (vectorised over the concept axis; NC classes at a time so that accumulators fit in registers)
// ------------------------------------------------------------------------------------------------------------
// unroll so that at least ~8 FMA chains are in flight (FMA latency 4, two ports)
template <int NC>
constexpr int unroll() { return NC <= 2 ? 4 : (NC <= 4 ? 2 : 1); }

// out[q] = sum_j zrow[j] * Wt[(c0 + q) * Mp + j], q < NC
template <int NC>
inline void dot_chunk(const float* zrow, const float* Wt, int Mp, int c0, float* out) {
  constexpr int U = unroll<NC>();
  __m256 acc[U][NC];
  for (int u = 0; u < U; ++u)
    for (int q = 0; q < NC; ++q) acc[u][q] = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 * U <= Mp; j += 8 * U)
    for (int u = 0; u < U; ++u) {
      __m256 z = _mm256_load_ps(zrow + j + 8 * u);
      for (int q = 0; q < NC; ++q)
        acc[u][q] = _mm256_fmadd_ps(z, _mm256_load_ps(Wt + (int64_t)(c0 + q) * Mp + j + 8 * u), acc[u][q]);
    }
  for (; j < Mp; j += 8) {
    __m256 z = _mm256_load_ps(zrow + j);
    for (int q = 0; q < NC; ++q) acc[0][q] = _mm256_fmadd_ps(z, _mm256_load_ps(Wt + (int64_t)(c0 + q) * Mp + j), acc[0][q]);
  }
  for (int q = 0; q < NC; ++q) {
    for (int u = 1; u < U; ++u) acc[0][q] = _mm256_add_ps(acc[0][q], acc[u][q]);
    out[q] = hsum(acc[0][q]);
  }
}

template <int K>
inline void dense_logits(const float* zrow, const float* Wt, int Mp, float* out) {
  dot_chunk<(K < 8 ? K : 8)>(zrow, Wt, Mp, 0, out);
  if constexpr (K > 8) dot_chunk<K - 8>(zrow, Wt, Mp, 8, out + 8);
}

// dWt[(c0+q) * Mp + j] += sum_i G[i * K + c0 + q] * Zm[i * Mp + j]  over the n rows of a block
template <int K, int NC>
inline void dw_chunk(const float* Zm, const float* G, int n, int Mp, int c0, float* dWt) {
  constexpr int U = unroll<NC>();
  for (int j = 0; j < Mp; j += 8) {
    __m256 acc[U][NC];
    for (int u = 0; u < U; ++u)
      for (int q = 0; q < NC; ++q) acc[u][q] = _mm256_setzero_ps();
    int i = 0;
    for (; i + U <= n; i += U)
      for (int u = 0; u < U; ++u) {
        __m256 z = _mm256_load_ps(Zm + (int64_t)(i + u) * Mp + j);
        const float* g = G + (int64_t)(i + u) * K + c0;
        for (int q = 0; q < NC; ++q) acc[u][q] = _mm256_fmadd_ps(_mm256_broadcast_ss(g + q), z, acc[u][q]);
      }
    for (; i < n; ++i) {
      __m256 z = _mm256_load_ps(Zm + (int64_t)i * Mp + j);
      const float* g = G + (int64_t)i * K + c0;
      for (int q = 0; q < NC; ++q) acc[0][q] = _mm256_fmadd_ps(_mm256_broadcast_ss(g + q), z, acc[0][q]);
    }
    for (int q = 0; q < NC; ++q) {
      for (int u = 1; u < U; ++u) acc[0][q] = _mm256_add_ps(acc[0][q], acc[u][q]);
      float* d = dWt + (int64_t)(c0 + q) * Mp + j;
      _mm256_store_ps(d, _mm256_add_ps(_mm256_load_ps(d), acc[0][q]));
    }
  }
}

// dz[i, j] = sum_c G[i, c] W[j, c] on kept entries (zm != 0); dg[j] += sum_i dz * ah, dbe[j] += sum_i dz
template <int K>
inline void dz_block(const float* Zm, const float* AH, const float* G, const float* Wt, int n, int Mp, float* dg,
                     float* dbe) {
  const __m256 zero = _mm256_setzero_ps();
  for (int j = 0; j < Mp; j += 8) {
    __m256 w[K];
    for (int c = 0; c < K; ++c) w[c] = _mm256_load_ps(Wt + (int64_t)c * Mp + j);
    __m256 ga0 = zero, ga1 = zero, ba0 = zero, ba1 = zero;
    int i = 0;
    for (; i + 2 <= n; i += 2) {
      const float* g0 = G + (int64_t)i * K;
      const float* g1 = g0 + K;
      __m256 d0 = _mm256_mul_ps(_mm256_broadcast_ss(g0), w[0]), d1 = _mm256_mul_ps(_mm256_broadcast_ss(g1), w[0]);
      for (int c = 1; c < K; ++c) {
        d0 = _mm256_fmadd_ps(_mm256_broadcast_ss(g0 + c), w[c], d0);
        d1 = _mm256_fmadd_ps(_mm256_broadcast_ss(g1 + c), w[c], d1);
      }
      __m256 z0 = _mm256_load_ps(Zm + (int64_t)i * Mp + j), z1 = _mm256_load_ps(Zm + (int64_t)(i + 1) * Mp + j);
      d0 = _mm256_and_ps(d0, _mm256_cmp_ps(z0, zero, _CMP_NEQ_OQ));
      d1 = _mm256_and_ps(d1, _mm256_cmp_ps(z1, zero, _CMP_NEQ_OQ));
      ga0 = _mm256_fmadd_ps(d0, _mm256_load_ps(AH + (int64_t)i * Mp + j), ga0);
      ga1 = _mm256_fmadd_ps(d1, _mm256_load_ps(AH + (int64_t)(i + 1) * Mp + j), ga1);
      ba0 = _mm256_add_ps(ba0, d0);
      ba1 = _mm256_add_ps(ba1, d1);
    }
    for (; i < n; ++i) {
      const float* g0 = G + (int64_t)i * K;
      __m256 d0 = _mm256_mul_ps(_mm256_broadcast_ss(g0), w[0]);
      for (int c = 1; c < K; ++c) d0 = _mm256_fmadd_ps(_mm256_broadcast_ss(g0 + c), w[c], d0);
      __m256 z0 = _mm256_load_ps(Zm + (int64_t)i * Mp + j);
      d0 = _mm256_and_ps(d0, _mm256_cmp_ps(z0, zero, _CMP_NEQ_OQ));
      ga0 = _mm256_fmadd_ps(d0, _mm256_load_ps(AH + (int64_t)i * Mp + j), ga0);
      ba0 = _mm256_add_ps(ba0, d0);
    }
    _mm256_store_ps(dg + j, _mm256_add_ps(_mm256_load_ps(dg + j), _mm256_add_ps(ga0, ga1)));
    _mm256_store_ps(dbe + j, _mm256_add_ps(_mm256_load_ps(dbe + j), _mm256_add_ps(ba0, ba1)));
  }
}

// lane e of the result = sum of the 8 lanes of d[e]
inline __m256 hsum8(const __m256* d) {
  __m256 t0 = _mm256_hadd_ps(d[0], d[1]), t1 = _mm256_hadd_ps(d[2], d[3]);
  __m256 t2 = _mm256_hadd_ps(d[4], d[5]), t3 = _mm256_hadd_ps(d[6], d[7]);
  __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// ------------------------------------------------------------------------------------------------------------
// sparse rows (16-lane class vectors: V = 1 or 2 registers; W16 rows and b16 zero-padded)
// ------------------------------------------------------------------------------------------------------------
template <int K>
struct Lanes {
  static constexpr int V = (K + 7) / 8;
};

// logits (16 lanes) = b16 + sum_e z[kidx[e]] * W16[kidx[e]]
template <int K>
inline void sparse_logits(const float* z, const int32_t* kidx, int ne, const float* W16, const float* b16, __m256* out) {
  constexpr int V = Lanes<K>::V;
  __m256 a[2][V];
  for (int v = 0; v < V; ++v) {
    a[0][v] = _mm256_load_ps(b16 + 8 * v);
    a[1][v] = _mm256_setzero_ps();
  }
  int e = 0;
  for (; e + 2 <= ne; e += 2) {
    const int j0 = kidx[e], j1 = kidx[e + 1];
    const __m256 z0 = _mm256_broadcast_ss(z + j0), z1 = _mm256_broadcast_ss(z + j1);
    for (int v = 0; v < V; ++v) {
      a[0][v] = _mm256_fmadd_ps(z0, _mm256_load_ps(W16 + (int64_t)j0 * KMAX + 8 * v), a[0][v]);
      a[1][v] = _mm256_fmadd_ps(z1, _mm256_load_ps(W16 + (int64_t)j1 * KMAX + 8 * v), a[1][v]);
    }
  }
  if (e < ne) {
    const int j0 = kidx[e];
    const __m256 z0 = _mm256_broadcast_ss(z + j0);
    for (int v = 0; v < V; ++v) a[0][v] = _mm256_fmadd_ps(z0, _mm256_load_ps(W16 + (int64_t)j0 * KMAX + 8 * v), a[0][v]);
  }
  for (int v = 0; v < V; ++v) out[v] = _mm256_add_ps(a[0][v], a[1][v]);
}

// ------------------------------------------------------------------------------------------------------------
// one head: training step (gradients into dW [M, K], db [K], dg [M], dbe [M], zeroed here) and evaluation
// ------------------------------------------------------------------------------------------------------------
template <int K>
struct Kernel {
  static constexpr int V = Lanes<K>::V;

  // W transposed [K, Mp] (zero pad) for dense heads; W padded [M, 16] and b [16] for sparse heads
  static void prepare(const Head& hd, Ws& ws, int Mp) {
    if (hd.dense) {
      float* wt = ws.wt.get((size_t)K * Mp);
      std::memset(wt, 0, sizeof(float) * K * Mp);
      for (int j = 0; j < hd.M; ++j)
        for (int c = 0; c < K; ++c) wt[(int64_t)c * Mp + j] = hd.W[(int64_t)j * K + c];
    } else {
      float* w16 = ws.w16.get((size_t)hd.M * KMAX);
      std::memset(w16, 0, sizeof(float) * hd.M * KMAX);
      for (int j = 0; j < hd.M; ++j) std::memcpy(w16 + (int64_t)j * KMAX, hd.W + (int64_t)j * K, sizeof(float) * K);
    }
    float* b16 = ws.b16.get(KMAX);
    std::memset(b16, 0, sizeof(float) * KMAX);
    std::memcpy(b16, hd.b, sizeof(float) * K);
  }

  // One step on the batch rows ab [nb, M] (gathered once per step for all heads) with labels yb [nb].
  // Returns the summed cross-entropy of the nb rows (unscaled).
  static double train(const Head& hd, const float* ab, const int64_t* yb, int64_t nb, float scale, Ws& ws,
                      const Grads& gr) {
    const int M = hd.M, Mp = pad8(M);
    prepare(hd, ws, Mp);
    float* dg = ws.dg.get(Mp);
    float* dbe = ws.dbe.get(Mp);
    std::memset(dg, 0, sizeof(float) * Mp);
    std::memset(dbe, 0, sizeof(float) * Mp);
    std::memset(gr.db, 0, sizeof(float) * K);
    float* az = ws.az.get(Mp);
    float* cand = ws.cand.get(Mp + 8);
    SelState st;
    double loss = 0.0;
    if (hd.dense) {
      const int RB = std::max(1, hd.row_block);
      float* Zm = ws.zm.get((size_t)RB * Mp);
      float* AH = ws.ah.get((size_t)RB * Mp);
      float* G = ws.lg.get((size_t)RB * K + 8);
      float* dWt = ws.dwt.get((size_t)K * Mp);
      std::memset(dWt, 0, sizeof(float) * K * Mp);
      const float* Wt = ws.wt.p;
      for (int64_t r0 = 0; r0 < nb; r0 += RB) {
        const int n = (int)std::min<int64_t>(RB, nb - r0);
        for (int i = 0; i < n; ++i) {
          const int64_t row = r0 + i;
          float* zi = Zm + (int64_t)i * Mp;
          float amax = affine_abs(ab + row * M, hd.gam, hd.bet, M, AH + (int64_t)i * Mp, zi, az);
          float thr = select_rth(az, Mp, M, hd.r, amax, st, cand);
          int kept = mask_row(zi, az, thr, M, Mp);
          if (gr.dbg_kept) gr.dbg_kept[r0 + i] = kept;
          float* gi = G + (int64_t)i * K;
          dense_logits<K>(zi, Wt, Mp, gi);
          for (int c = 0; c < K; ++c) gi[c] += hd.b[c];
          if (gr.dbg_logits) std::memcpy(gr.dbg_logits + (r0 + i) * K, gi, sizeof(float) * K);
          loss += softmax_ce_row(gi, nullptr, K, yb[row], scale);
          for (int c = 0; c < K; ++c) gr.db[c] += gi[c];
        }
        dw_chunk<K, (K < 8 ? K : 8)>(Zm, G, n, Mp, 0, dWt);
        if constexpr (K > 8) dw_chunk<K, K - 8>(Zm, G, n, Mp, 8, dWt);
        dz_block<K>(Zm, AH, G, Wt, n, Mp, dg, dbe);
      }
      for (int j = 0; j < M; ++j)
        for (int c = 0; c < K; ++c) gr.dW[(int64_t)j * K + c] = dWt[(int64_t)c * Mp + j];
    } else {
      const float* W16 = ws.w16.p;
      float* z = ws.z.get(Mp);
      float* dw16 = ws.dw16.get((size_t)M * KMAX);
      std::memset(dw16, 0, sizeof(float) * M * KMAX);
      ws.kidx.resize(Mp + 8);
      int32_t* kidx = ws.kidx.data();
      alignas(32) float lg[KMAX];
      __m256 dbv[V];
      for (int v = 0; v < V; ++v) dbv[v] = _mm256_setzero_ps();
      for (int64_t i = 0; i < nb; ++i) {
        const float* ah = ab + i * M;
        float amax = affine_abs(ah, hd.gam, hd.bet, M, nullptr, z, az);
        float thr = select_rth(az, Mp, M, hd.r, amax, st, cand);
        const int ne = kept_indices(az, thr, M, Mp, kidx);
        if (gr.dbg_kept) gr.dbg_kept[i] = ne;
        __m256 lv[V];
        sparse_logits<K>(z, kidx, ne, W16, ws.b16.p, lv);
        for (int v = 0; v < V; ++v) _mm256_store_ps(lg + 8 * v, lv[v]);
        if (gr.dbg_logits) std::memcpy(gr.dbg_logits + i * K, lg, sizeof(float) * K);
        loss += softmax_ce_row(lg, nullptr, K, yb[i], scale);
        __m256 g[V];
        for (int v = 0; v < V; ++v) {
          const int lanes = std::min(8, K - 8 * v);
          g[v] = _mm256_and_ps(_mm256_load_ps(lg + 8 * v), _mm256_castsi256_ps(tail_mask(lanes)));
          dbv[v] = _mm256_add_ps(dbv[v], g[v]);
        }
        // per kept entry j: dW[j] += z_j g; dz_j = g . W[j] (eight at a time, one transpose-reduce)
        alignas(32) float dz[8];
        for (int e0 = 0; e0 < ne; e0 += 8) {
          const int cnt = std::min(8, ne - e0);
          __m256 d[8];
          for (int u = 0; u < 8; ++u) {
            if (u >= cnt) {
              d[u] = _mm256_setzero_ps();
              continue;
            }
            const int j = kidx[e0 + u];
            const float* wj = W16 + (int64_t)j * KMAX;
            float* dwj = dw16 + (int64_t)j * KMAX;
            const __m256 zj = _mm256_broadcast_ss(z + j);
            d[u] = _mm256_mul_ps(g[0], _mm256_load_ps(wj));
            _mm256_store_ps(dwj, _mm256_fmadd_ps(zj, g[0], _mm256_load_ps(dwj)));
            if constexpr (V > 1) {
              d[u] = _mm256_fmadd_ps(g[1], _mm256_load_ps(wj + 8), d[u]);
              _mm256_store_ps(dwj + 8, _mm256_fmadd_ps(zj, g[1], _mm256_load_ps(dwj + 8)));
            }
          }
          _mm256_store_ps(dz, hsum8(d));
          for (int u = 0; u < cnt; ++u) {
            const int j = kidx[e0 + u];
            dg[j] += dz[u] * ah[j];
            dbe[j] += dz[u];
          }
        }
      }
      alignas(32) float dbt[KMAX];
      for (int v = 0; v < V; ++v) _mm256_store_ps(dbt + 8 * v, dbv[v]);
      std::memcpy(gr.db, dbt, sizeof(float) * K);
      for (int j = 0; j < M; ++j) std::memcpy(gr.dW + (int64_t)j * K, dw16 + (int64_t)j * KMAX, sizeof(float) * K);
    }
    std::memcpy(gr.dg, dg, sizeof(float) * M);
    std::memcpy(gr.dbe, dbe, sizeof(float) * M);
    return loss;
  }

  // number of rows of (ahat [N, M], y) whose argmax (first maximum) of the head's logits is the label
  static int64_t eval(const Head& hd, const float* ahat, const int64_t* y, int64_t N, Ws& ws) {
    const int M = hd.M, Mp = pad8(M);
    prepare(hd, ws, Mp);
    float* az = ws.az.get(Mp);
    float* cand = ws.cand.get(Mp + 8);
    float* z = ws.z.get(Mp);
    ws.kidx.resize(Mp + 8);
    int32_t* kidx = ws.kidx.data();
    SelState st;
    alignas(32) float lg[KMAX];
    int64_t correct = 0;
    for (int64_t i = 0; i < N; ++i) {
      float amax = affine_abs(ahat + i * M, hd.gam, hd.bet, M, nullptr, z, az);
      float thr = select_rth(az, Mp, M, hd.r, amax, st, cand);
      if (hd.dense) {
        mask_row(z, az, thr, M, Mp);
        dense_logits<K>(z, ws.wt.p, Mp, lg);
        for (int c = 0; c < K; ++c) lg[c] += hd.b[c];
      } else {
        const int ne = kept_indices(az, thr, M, Mp, kidx);
        __m256 lv[V];
        sparse_logits<K>(z, kidx, ne, ws.w16.p, ws.b16.p, lv);
        for (int v = 0; v < V; ++v) _mm256_store_ps(lg + 8 * v, lv[v]);
      }
      correct += argmax_row(lg, nullptr, K) == y[i];
    }
    return correct;
  }
};

using TrainFn = double (*)(const Head&, const float*, const int64_t*, int64_t, float, Ws&, const Grads&);
using EvalFn = int64_t (*)(const Head&, const float*, const int64_t*, int64_t, Ws&);

template <int... Ks>
struct Table {
  static constexpr TrainFn train[] = {nullptr, &Kernel<Ks>::train...};
  static constexpr EvalFn eval[] = {nullptr, &Kernel<Ks>::eval...};
};
using Kernels = Table<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

inline TrainFn train_fn(int K) { return K >= 1 && K <= KMAX ? Kernels::train[K] : nullptr; }
inline EvalFn eval_fn(int K) { return K >= 1 && K <= KMAX ? Kernels::eval[K] : nullptr; }

}  // namespace narrow
}  // namespace iis
#endif  // IIS_AVX2
