// The grid (docs/spec.md §1.3-1.5): every probe and sparse concept head of an IIS run, trained together. One
// step = one OpenMP region for all of them (the schedule below); evaluation likewise. The kernels it calls:
// gemm.h (probes), wide.h / narrow.h (concept heads), adam.h. No Python here: bindings.cpp checks the arrays.
//
// Parameters live in float32 arrays owned by the caller (updated in place). Layouts:
//   wp [D, L*K] (probe l in columns l*K..), bp [L*K], w [H, M, K], b [H, K], gamma/beta [H, M]; Adam moments
//   the same. ahat is either shared by every head ([N, M], rows picked by idx) or per head ([H, nb, M], the
//   batch's rows in order: end2end, where every head has its own concepts, docs/spec.md §1.2); then a step can
//   also return the gradient of every head's loss with respect to its ahat (dahat [H, nb, M]).
#pragma once

#include "adam.h"
#include "gemm.h"
#include "narrow.h"
#include "rows.h"
#include "wide.h"

namespace iis {

// The caller's arrays (shapes checked by the caller) and the grid's constants.
struct GridArrays {
  int64_t D, M, K, L, H;
  float *wp, *bp, *w, *b, *gam, *bet;                                    // parameters
  float *mwp, *vwp, *mbp, *vbp, *mw, *vw, *mb, *vb, *mg, *vg, *mbe, *vbe;  // Adam moments
  const int64_t* ks;                                                     // [H] threshold rank k of every head
  const double *lr_probe, *lr_head;                                      // [L], [H]
};

// Optional outputs of one step, for tests (all written when given): logits and gradients before the update.
struct DebugOut {
  float *probe_logits = nullptr, *head_logits = nullptr, *dwp = nullptr, *dbp = nullptr, *dw = nullptr,
        *db = nullptr, *dgamma = nullptr, *dbeta = nullptr;
  int64_t* kept = nullptr;
  float *loss_probe = nullptr, *loss_head = nullptr;
};

class Grid {
 public:
  int64_t D, M, K, L, H;
  std::vector<int64_t> ks;
  std::vector<double> lr_probe, lr_head;
  int64_t t = 0;            // Adam step count
  int mode = -1;            // -1: choose per head from k; 0: all sparse; 1: all dense
  double dense_frac = 0.5;  // dense products when kept entries >= dense_frac * M
  int row_block = 256;      // rows per block of a wide head's scratch (and of a dense narrow head's)
  bool narrow = true;       // K <= 16 with AVX2: the register-resident row kernels of narrow.h

  explicit Grid(const GridArrays& a)
      : D(a.D), M(a.M), K(a.K), L(a.L), H(a.H), ks(a.ks, a.ks + a.H), lr_probe(a.lr_probe, a.lr_probe + a.L),
        lr_head(a.lr_head, a.lr_head + a.H), p_(a) {}

  bool head_dense(int64_t h) const {
    if (mode >= 0) return mode == 1;
    return (double)(M - ks[h] - 1) >= dense_frac * (double)M;
  }

  // One Adam step of every probe and head on rows idx [nb] of (x [N, D], ahat, y [N]). ahat_stride: 0 = one
  // ahat [N, M] shared by every head (rows idx); else head h reads its own [nb, M] block at ahat + h *
  // ahat_stride (the batch's rows in order) and, with dahat, writes its d loss / d ahat there too.
  void step(const float* x, const float* ahat, int64_t ahat_stride, float* dahat, const int64_t* y,
            const int64_t* idx, int64_t nb, double lr_scale, DebugOut* dbg) {
    ensure_ws();
    ++t;
    const double bc1 = 1.0 - std::pow(0.9, (double)t);
    const float bc2s = (float)std::sqrt(1.0 - std::pow(0.999, (double)t));
    const float scale = 1.0f / (float)nb;
    const int64_t LK = L * K;
    const int nt = std::min((int)gws_.size(), std::max(1, max_threads()));

    // One parallel region per step (one barrier): on a busy 2-core machine every extra fork/join costs a
    // scheduler slice. Phase 1: each thread the probe logits + CE of its own rows. Phase 2: each thread dbp,
    // dwp = x[idx]^T G and Adam of its own columns. Phase 3: concept heads, one thread per head (dynamic).
    std::vector<double> lossp(L * nt, 0.0);
    std::vector<float> ssp(L);
    for (int64_t l = 0; l < L; ++l) ssp[l] = (float)(lr_probe[l] * lr_scale / bc1);
    float* P = L > 0 ? plog_.get(nb * LK) : nullptr;
    float* dbp = L > 0 ? pdb_.get(LK) : nullptr;
    float* dwp = L > 0 ? pdw_.get(D * LK) : nullptr;
    float* xb = L > 0 ? xb_.get((size_t)nb * D) : nullptr;
    std::vector<int64_t> order = head_order();
    const bool gather = use_narrow() && H > 0 && ahat_stride == 0;
    if (gather) {
      ab_.get((size_t)nb * M);
      yb_.resize(nb);
    }
#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_id(), T = num_threads();
      if (gather) {  // rows read by every head: one contiguous copy (random rows of a large ahat miss in cache)
        for (int64_t i = nb * tid / T; i < nb * (tid + 1) / T; ++i) {
          std::memcpy(ab_.p + i * M, ahat + idx[i] * M, sizeof(float) * M);
          yb_[i] = y[idx[i]];
        }
        if (L == 0) {
#pragma omp barrier
        }
      }
      if (L > 0) {
        int64_t rp = (nb + MR - 1) / MR;
        int64_t i0 = std::min(nb, rp * tid / T * MR), i1 = std::min(nb, rp * (tid + 1) / T * MR);
        // x[idx] gathered once into contiguous rows: read by the forward here and, transposed, by dwp below
        for (int64_t i = i0; i < i1; ++i) std::memcpy(xb + i * D, x + idx[i] * D, sizeof(float) * D);
        if (i1 > i0) {
          gemm_serial(i1 - i0, LK, D, Mat{xb + i0 * D, D, 1}, Mat{p_.wp, LK, 1}, P + i0 * LK, LK, false, gws_[tid]);
          if (dbg)
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t c = 0; c < LK; ++c) dbg->probe_logits[i * LK + c] = P[i * LK + c] + p_.bp[c];
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t l = 0; l < L; ++l)
              lossp[tid * L + l] += softmax_ce_row(P + i * LK + l * K, p_.bp + l * K, (int)K, y[idx[i]], scale);
        }
#pragma omp barrier
        // dwp = x[idx]^T G split in rectangles: by rows of D when the probes are narrow (each thread then packs
        // only its half of x[idx]^T, the large operand), else by columns (each thread packs only its half of G)
        const bool split_rows = LK < D;
        int64_t d0 = 0, d1 = D, c0 = 0, c1 = LK;
        if (split_rows) {
          int64_t rpd = (D + MR - 1) / MR;
          d0 = std::min(D, rpd * tid / T * MR), d1 = std::min(D, rpd * (tid + 1) / T * MR);
        } else {
          int64_t cp = (LK + NR - 1) / NR;
          c0 = std::min(LK, cp * tid / T * NR), c1 = std::min(LK, cp * (tid + 1) / T * NR);
        }
        if (d1 > d0 && c1 > c0) {
          gemm_serial(d1 - d0, c1 - c0, nb, Mat{xb + d0, 1, D}, Mat{P + c0, LK, 1}, dwp + d0 * LK + c0, LK, false,
                      gws_[tid]);
          if (dbg)
            for (int64_t d = d0; d < d1; ++d)
              std::memcpy(dbg->dwp + d * LK + c0, dwp + d * LK + c0, sizeof(float) * (c1 - c0));
          for (int64_t s0 = c0; s0 < c1;) {  // segments of one probe (one lr) each
            int64_t l = s0 / K, s1 = std::min(c1, (l + 1) * K);
            for (int64_t d = d0; d < d1; ++d)
              adam_update(p_.wp + d * LK + s0, p_.mwp + d * LK + s0, p_.vwp + d * LK + s0, dwp + d * LK + s0,
                          s1 - s0, ssp[l], bc2s);
            s0 = s1;
          }
        }
        if (split_rows ? tid == 0 : c1 > c0) {  // the bias of columns c0..c1
          for (int64_t c = c0; c < c1; ++c) dbp[c] = 0.f;
          for (int64_t i = 0; i < nb; ++i) add_row(dbp + c0, P + i * LK + c0, (int)(c1 - c0));
          if (dbg) std::memcpy(dbg->dbp + c0, dbp + c0, sizeof(float) * (c1 - c0));
          for (int64_t s0 = c0; s0 < c1;) {
            int64_t l = s0 / K, s1 = std::min(c1, (l + 1) * K);
            adam_update(p_.bp + s0, p_.mbp + s0, p_.vbp + s0, dbp + s0, s1 - s0, ssp[l], bc2s);
            s0 = s1;
          }
        }
      }
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t oi = 0; oi < H; ++oi) {
        int64_t h = order[oi];
        float ss = (float)(lr_head[h] * lr_scale / bc1);
        head_step(h, ahat + h * ahat_stride, ahat_stride ? nullptr : idx, idx, y, nb, scale, ss, bc2s, tid, dbg,
                  dahat ? dahat + h * nb * M : nullptr);
      }
    }
    if (dbg)
      for (int64_t l = 0; l < L; ++l) {
        double sum = 0;
        for (int th = 0; th < nt; ++th) sum += lossp[th * L + l];
        dbg->loss_probe[l] = (float)(sum / (double)nb);
      }
  }

  // Correct top-1 predictions of every probe (cp [L]) and head (ch [H]) on (x [N, D], ahat, y [N]); ahat_stride
  // as in step (per head: [H, N, M]).
  void evaluate(const float* x, const float* ahat_all, int64_t ahat_stride, const int64_t* y, int64_t N, int64_t* cp,
                int64_t* ch) {
    ensure_ws();
    const int64_t LK = L * K;
    const int nt = std::min((int)gws_.size(), std::max(1, max_threads()));
    const int64_t EB = 512;  // probe rows per block, per thread
    std::vector<int64_t> cnt(nt * std::max<int64_t>(L, 1), 0);
    std::vector<int64_t> order = head_order();
    if (L > 0) plog_.get(nt * EB * LK);
    const int64_t nblk = (N + EB - 1) / EB;
#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_id();
      if (L > 0) {
        float* P = plog_.p + tid * EB * LK;
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t blk = 0; blk < nblk; ++blk) {
          int64_t r0 = blk * EB, n = std::min(EB, N - r0);
          gemm_serial(n, LK, D, Mat{x + r0 * D, D, 1}, Mat{p_.wp, LK, 1}, P, LK, false, gws_[tid]);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t l = 0; l < L; ++l)
              cnt[tid * L + l] += argmax_row(P + i * LK + l * K, p_.bp + l * K, (int)K) == y[r0 + i];
        }
      }
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t oi = 0; oi < H; ++oi) {
        const int64_t h = order[oi];
        const float* ahat = ahat_all + h * ahat_stride;
#if IIS_AVX2
        if (use_narrow()) {
          ch[h] = narrow::eval_fn((int)K)(head(h), ahat, y, N, nws_[tid]);
          continue;
        }
#endif
        ch[h] = wide::eval(head(h), ahat, y, N, wws_[tid]);
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      cp[l] = 0;
      for (int th = 0; th < nt; ++th) cp[l] += cnt[th * L + l];
    }
  }

 private:
  GridArrays p_;
  std::vector<GemmWs> gws_;  // per thread: the probes' GEMM scratch
  std::vector<wide::Ws> wws_;
#if IIS_AVX2
  std::vector<narrow::Ws> nws_;
#endif
  struct HeadGrads {
    Buf dW, db, dg, dbe;
  };
  std::vector<HeadGrads> hgs_;
  Buf plog_, pdw_, pdb_;
  Buf xb_;  // the batch's feature rows x[idx], contiguous
  Buf ab_;  // narrow heads: the batch's ahat rows, gathered once per step for every head
  std::vector<int64_t> yb_;

  void ensure_ws() {
    size_t nt = (size_t)std::max(1, max_threads());
    if (gws_.size() < nt) gws_.resize(nt);
    if (wws_.size() < nt) wws_.resize(nt);
    if (hgs_.size() < nt) hgs_.resize(nt);
#if IIS_AVX2
    if (nws_.size() < nt) nws_.resize(nt);
#endif
  }

  bool use_narrow() const {
#if IIS_AVX2
    return narrow && K <= narrow::KMAX;
#else
    return false;
#endif
  }

  // The schedule of the head loop (dynamic, one head at a time): most expensive first, so that the last heads
  // to start are the cheap ones.
  std::vector<int64_t> head_order() const {
    std::vector<int64_t> order(H);
    std::vector<double> cost(H);
    for (int64_t h = 0; h < H; ++h) {
      order[h] = h;
      double kept = head_dense(h) ? (double)M : (double)(M - ks[h] - 1) * 2.0;
      cost[h] = kept * (double)K + 8.0 * (double)M;
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return cost[a] > cost[c]; });
    return order;
  }

  Head head(int64_t h) const {
    return Head{p_.w + h * M * K, p_.b + h * K, p_.gam + h * M, p_.bet + h * M, (int)M, (int)K, (int)ks[h] + 1,
                head_dense(h), row_block};
  }

  // Head h's gradients on the batch (ahat rows: aidx[i] of a shared ahat, or row i of this head's own block when
  // aidx == nullptr; dah: its d loss / d ahat [nb, M], optional), then its Adam step.
  void head_step(int64_t h, const float* ahat, const int64_t* aidx, const int64_t* idx, const int64_t* y,
                 int64_t nb, float scale, float step_size, float bc2s, int tid, DebugOut* dbg, float* dah) {
    HeadGrads& hg = hgs_[tid];
    Grads gr{hg.dW.get(M * K), hg.db.get(K), hg.dg.get(M), hg.dbe.get(M)};
    if (dbg) {
      gr.dbg_logits = dbg->head_logits + h * nb * K;
      gr.dbg_kept = dbg->kept + h * nb;
    }
    double loss;
#if IIS_AVX2
    if (use_narrow() && dah == nullptr && aidx != nullptr)  // the batch gathered into ab_ / yb_ by step()
      loss = narrow::train_fn((int)K)(head(h), ab_.p, yb_.data(), nb, scale, nws_[tid], gr);
    else
#endif
      loss = wide::train(head(h), ahat, aidx, y, idx, nb, scale, wws_[tid], gr, dah);
    if (dbg) {
      std::memcpy(dbg->dw + h * M * K, gr.dW, sizeof(float) * M * K);
      std::memcpy(dbg->db + h * K, gr.db, sizeof(float) * K);
      std::memcpy(dbg->dgamma + h * M, gr.dg, sizeof(float) * M);
      std::memcpy(dbg->dbeta + h * M, gr.dbe, sizeof(float) * M);
      dbg->loss_head[h] = (float)(loss / (double)nb);
    }
    adam_update(p_.w + h * M * K, p_.mw + h * M * K, p_.vw + h * M * K, gr.dW, M * K, step_size, bc2s);
    adam_update(p_.b + h * K, p_.mb + h * K, p_.vb + h * K, gr.db, K, step_size, bc2s);
    adam_update(p_.gam + h * M, p_.mg + h * M, p_.vg + h * M, gr.dg, M, step_size, bc2s);
    adam_update(p_.bet + h * M, p_.mbe + h * M, p_.vbe + h * M, gr.dbe, M, step_size, bc2s);
  }
};

}  // namespace iis
