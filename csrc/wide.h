// Wide concept heads (any K; every head in the base build, K > 16 in the AVX2 build): one head's batch step and
// its evaluation, a block of row_block rows at a time. Per row, the affine and threshold of select.h; then per
// block either dense products over all M concepts (Z = masked z [n, Mp]: logits Z W, dW += Z^T G, dZ = G W^T,
// with the GEMM of gemm.h) or, for sparse heads, a CSR of the kept entries: logits as a gather of W's kept rows,
// dz on the kept entries only, and dW through the kept pattern transposed (CSC) so that dW[j] accumulates in
// registers. Gradients into Grads (head.h); the grid applies Adam.
#pragma once

#include "gemm.h"
#include "head.h"
#include "rows.h"
#include "select.h"

namespace iis {
namespace wide {

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

// dgamma += dz * ahat, dbeta += dz over the kept entries (kept <=> z != 0, since |z| > thr >= 0)
inline void masked_grad_row(float* dg, float* dbe, const float* z, const float* dz, const float* ah, int M) {
  int j = 0;
#if IIS_AVX2
  __m256 zero = _mm256_setzero_ps();
  for (; j + 8 <= M; j += 8) {
    __m256 k = _mm256_cmp_ps(_mm256_loadu_ps(z + j), zero, _CMP_NEQ_OQ);
    __m256 d = _mm256_and_ps(k, _mm256_loadu_ps(dz + j));
    _mm256_storeu_ps(dg + j, _mm256_add_ps(_mm256_loadu_ps(dg + j), _mm256_mul_ps(d, _mm256_loadu_ps(ah + j))));
    _mm256_storeu_ps(dbe + j, _mm256_add_ps(_mm256_loadu_ps(dbe + j), d));
  }
#endif
  for (; j < M; ++j)
    if (z[j] != 0.f) {
      dg[j] += dz[j] * ah[j];
      dbe[j] += dz[j];
    }
}

// Per-thread scratch of one wide head.
struct Ws {
  Buf z, zrow, az, cand, logits, dz, val, cval, dots;
  std::vector<int32_t> rowptr, col, cptr, crow, fill;
  GemmWs gemm;
};

// Masked z of rows [r0, r0+n) (row r0 + i of ahat [., M] is idx[r0 + i], or r0 + i without idx): dense ->
// ws.z [n, Mp] (dropped entries 0); sparse -> CSR (ws.rowptr, ws.col, ws.val). kept (optional) receives the
// per-row counts at [r0 + i].
inline void build_rows(const Head& hd, const float* ahat, const int64_t* idx, int64_t r0, int n, Ws& ws,
                       SelState& st, int64_t* kept) {
  const int M = hd.M, Mp = pad8(M);
  float* az = ws.az.get(Mp);
  float* cand = ws.cand.get(Mp + 8);
  if (hd.dense) {
    float* Z = ws.z.get((size_t)hd.row_block * Mp);
    for (int i = 0; i < n; ++i) {
      const int64_t row = idx ? idx[r0 + i] : r0 + i;
      float* zi = Z + (int64_t)i * Mp;
      const float amax = affine_abs(ahat + row * M, hd.gam, hd.bet, M, nullptr, zi, az);
      const float thr = select_rth(az, Mp, M, hd.r, amax, st, cand);
      const int k = mask_row(zi, az, thr, M, Mp);
      if (kept) kept[r0 + i] = k;
    }
  } else {
    ws.rowptr.resize(hd.row_block + 1);
    ws.col.resize((size_t)hd.row_block * M + Mp + 8);
    int32_t* col = ws.col.data();
    float* val = ws.val.get((size_t)hd.row_block * M + 1);
    float* zi = ws.zrow.get(Mp);
    int64_t nnz = 0;
    ws.rowptr[0] = 0;
    for (int i = 0; i < n; ++i) {
      const int64_t row = idx ? idx[r0 + i] : r0 + i;
      const float amax = affine_abs(ahat + row * M, hd.gam, hd.bet, M, nullptr, zi, az);
      const float thr = select_rth(az, Mp, M, hd.r, amax, st, cand);
      const int ne = kept_indices(az, thr, M, Mp, col + nnz);
      for (int e = 0; e < ne; ++e) val[nnz + e] = zi[col[nnz + e]];
      nnz += ne;
      ws.rowptr[i + 1] = (int32_t)nnz;
      if (kept) kept[r0 + i] = ne;
    }
  }
}

// logits of the n rows built by build_rows (bias included) into ws.logits [n, K]
inline float* logits(const Head& hd, int n, Ws& ws) {
  const int M = hd.M, Mp = pad8(M), K = hd.K;
  float* Lg = ws.logits.get((size_t)hd.row_block * K);
  if (hd.dense) {
    gemm_serial(n, K, M, Mat{ws.z.p, Mp, 1}, Mat{hd.W, K, 1}, Lg, K, false, ws.gemm);
    for (int i = 0; i < n; ++i) add_row(Lg + (int64_t)i * K, hd.b, K);
  } else {
    const int32_t* rp = ws.rowptr.data();
    for (int i = 0; i < n; ++i)
      sparse_axpy_row(Lg + (int64_t)i * K, hd.b, hd.W, K, ws.col.data() + rp[i], ws.val.p + rp[i], rp[i + 1] - rp[i],
                      K);
  }
  return Lg;
}

// One step on nb rows: row i reads ahat row aidx[i] ([N, M], shared by every head) or, with aidx == nullptr,
// row i of this head's own block [nb, M]; its label is y[idx[i]]. dah (optional): d loss / d ahat [nb, M],
// written in full. Returns the summed cross-entropy of the nb rows (unscaled).
inline double train(const Head& hd, const float* ahat, const int64_t* aidx, const int64_t* y, const int64_t* idx,
                    int64_t nb, float scale, Ws& ws, const Grads& gr, float* dah) {
  const int M = hd.M, Mp = pad8(M), K = hd.K;
  float *dW = gr.dW, *db = gr.db, *dg = gr.dg, *dbe = gr.dbe;
  std::memset(dW, 0, sizeof(float) * M * K);
  std::memset(db, 0, sizeof(float) * K);
  std::memset(dg, 0, sizeof(float) * M);
  std::memset(dbe, 0, sizeof(float) * M);
  SelState st;
  double loss = 0.0;
  for (int64_t r0 = 0; r0 < nb; r0 += hd.row_block) {
    const int n = (int)std::min<int64_t>(hd.row_block, nb - r0);
    build_rows(hd, ahat, aidx, r0, n, ws, st, gr.dbg_kept);
    float* G = logits(hd, n, ws);
    if (gr.dbg_logits) std::memcpy(gr.dbg_logits + r0 * K, G, sizeof(float) * n * K);
    for (int i = 0; i < n; ++i) {
      loss += softmax_ce_row(G + (int64_t)i * K, nullptr, K, y[idx[r0 + i]], scale);
      add_row(db, G + (int64_t)i * K, K);
    }
    if (hd.dense) {
      const float* Z = ws.z.p;
      gemm_serial(M, K, n, Mat{Z, 1, Mp}, Mat{G, K, 1}, dW, K, true, ws.gemm);  // dW += Z^T G
      float* dZ = ws.dz.get((size_t)hd.row_block * M);
      gemm_serial(n, M, K, Mat{G, K, 1}, Mat{hd.W, 1, K}, dZ, M, false, ws.gemm);  // dZ = G W^T
      for (int i = 0; i < n; ++i) {
        const int64_t ar = aidx ? aidx[r0 + i] : r0 + i;
        const float* zi = Z + (int64_t)i * Mp;
        const float* dzi = dZ + (int64_t)i * M;
        masked_grad_row(dg, dbe, zi, dzi, ahat + ar * M, M);
        if (dah) {  // d ahat = dz * gamma at kept entries (kept <=> z != 0), 0 elsewhere
          float* out = dah + (r0 + i) * M;
          for (int j = 0; j < M; ++j) out[j] = zi[j] != 0.f ? dzi[j] * hd.gam[j] : 0.f;
        }
      }
    } else {
      const int32_t* rp = ws.rowptr.data();
      const int32_t* col = ws.col.data();
      const float* val = ws.val.p;
      const int64_t nnz = rp[n];
      float* dots = ws.dots.get(M);
      for (int i = 0; i < n; ++i) {  // dz at kept entries = G[i] . W[j]
        const float* ah = ahat + (aidx ? aidx[r0 + i] : r0 + i) * M;
        const int ne = rp[i + 1] - rp[i];
        sparse_dots(dots, G + (int64_t)i * K, hd.W, K, col + rp[i], ne, K);
        float* out = dah ? dah + (r0 + i) * M : nullptr;
        if (out) std::memset(out, 0, sizeof(float) * M);
        for (int e = 0; e < ne; ++e) {
          const int j = col[rp[i] + e];
          dg[j] += dots[e] * ah[j];
          dbe[j] += dots[e];
          if (out) out[j] = dots[e] * hd.gam[j];
        }
      }
      // transpose the kept pattern (CSC) so that dW[j] += sum_i z[i,j] G[i] accumulates in registers
      ws.cptr.assign(M + 1, 0);
      for (int64_t e = 0; e < nnz; ++e) ws.cptr[col[e] + 1]++;
      for (int j = 0; j < M; ++j) ws.cptr[j + 1] += ws.cptr[j];
      ws.crow.resize(std::max<int64_t>(nnz, 1));
      float* cval = ws.cval.get(std::max<int64_t>(nnz, 1));
      ws.fill.assign(ws.cptr.begin(), ws.cptr.end() - 1);
      for (int i = 0; i < n; ++i)
        for (int e = rp[i]; e < rp[i + 1]; ++e) {
          const int pos = ws.fill[col[e]]++;
          ws.crow[pos] = i;
          cval[pos] = val[e];
        }
      for (int j = 0; j < M; ++j) {
        const int ne = ws.cptr[j + 1] - ws.cptr[j];
        if (ne)
          sparse_axpy_row(dW + (int64_t)j * K, dW + (int64_t)j * K, G, K, ws.crow.data() + ws.cptr[j],
                          cval + ws.cptr[j], ne, K);
      }
    }
  }
  return loss;
}

// number of rows of (ahat [N, M], y) whose argmax (first maximum) of the head's logits is the label
inline int64_t eval(const Head& hd, const float* ahat, const int64_t* y, int64_t N, Ws& ws) {
  SelState st;
  int64_t correct = 0;
  for (int64_t r0 = 0; r0 < N; r0 += hd.row_block) {
    const int n = (int)std::min<int64_t>(hd.row_block, N - r0);
    build_rows(hd, ahat, nullptr, r0, n, ws, st, nullptr);
    const float* Lg = logits(hd, n, ws);
    for (int i = 0; i < n; ++i) correct += argmax_row(Lg + (int64_t)i * hd.K, nullptr, hd.K) == y[r0 + i];
  }
  return correct;
}

}  // namespace wide
}  // namespace iis
