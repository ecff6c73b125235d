// iis_fast._C: fused CPU kernels that train every probe and sparse concept head of an IIS grid at once
// (docs/spec.md §1.3-1.5). One call = one batch step for all heads: probe GEMMs + softmax-CE + backward + Adam, and per
// concept head (one thread each): affine, per-row threshold (selection), mask, dense GEMM or sparse gather,
// softmax-CE, backward (dW, db, dγ, dβ) and Adam, with intermediates kept in per-thread scratch.
//
// Parameters live in numpy float32 arrays owned by Python (updated in place). Layouts:
//   wp [D, L*K] (probe l in columns l*K..), bp [L*K], w [H, M, K], b [H, K], gamma/beta [H, M].
// ahat is either shared by every head ([N, M], rows picked by idx) or per head ([H, nb, M], the batch's rows in
// order: end2end, where every head has its own concepts, docs/spec.md §1.2); then step() can also return the
// gradient of every head's loss with respect to its ahat (dahat [H, nb, M]) for the backward into the concepts.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "gemm.h"
#include "narrow.h"

namespace py = pybind11;
using namespace iis;

namespace {

constexpr float LN_EPS = 1e-5f;

// ------------------------------------------------------------------------------------------------------------
// input checks: wrong dtype / shape / layout raise ValueError, never reach a kernel
// ------------------------------------------------------------------------------------------------------------
std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <typename T>
T* checked(const py::array& a, const char* name, std::initializer_list<int64_t> shape, bool writeable) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw std::invalid_argument(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                                ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != (py::ssize_t)shape.size())
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(shape.size()) + " dims, got shape " +
                                shape_str(a));
  int i = 0;
  for (int64_t s : shape) {
    if (s >= 0 && a.shape(i) != s)
      throw std::invalid_argument(std::string(name) + ": dim " + std::to_string(i) + " is " + std::to_string(a.shape(i)) +
                                  ", expected " + std::to_string(s) + " (shape " + shape_str(a) + ")");
    ++i;
  }
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": must be C-contiguous (use np.ascontiguousarray / .contiguous())");
  if (writeable && !a.writeable()) throw std::invalid_argument(std::string(name) + ": must be writeable");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

// ------------------------------------------------------------------------------------------------------------
// per-row threshold: the r-th smallest of n non-negative values (r = k + 1), by counting bisection + tiny select
// ------------------------------------------------------------------------------------------------------------
inline int count_le(const float* a, int n, float t) {
  int c = 0, j = 0;
#if IIS_AVX2
  __m256 tv = _mm256_set1_ps(t);
  for (; j + 8 <= n; j += 8)
    c += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(a + j), tv, _CMP_LE_OQ)));
#endif
  for (; j < n; ++j) c += a[j] <= t;
  return c;
}

// counts of a <= t1 and a <= t2 in one pass
inline void count_le2(const float* a, int n, float t1, float t2, int& c1, int& c2) {
  int x = 0, y = 0, j = 0;
#if IIS_AVX2
  __m256 u = _mm256_set1_ps(t1), v = _mm256_set1_ps(t2);
  for (; j + 8 <= n; j += 8) {
    __m256 av = _mm256_loadu_ps(a + j);
    x += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(av, u, _CMP_LE_OQ)));
    y += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(av, v, _CMP_LE_OQ)));
  }
#endif
  for (; j < n; ++j) {
    x += a[j] <= t1;
    y += a[j] <= t2;
  }
  c1 = x;
  c2 = y;
}

float kth_smallest(const float* a, int n, int r, float amax, float* cand) {
  // invariant: count(a <= lo) = clo < r <= chi = count(a <= hi); the answer lies in (lo, hi].
  // Each pass counts at two cuts placed by linear interpolation of the rank around r (a bracket of ~2*SPAN
  // candidates); when interpolation fails to shrink the bracket the next pass bisects.
  constexpr int SPAN = 6, DONE = 24;
  float lo = -1.f, hi = amax;
  int clo = 0, chi = n;
  bool bisect = false;
  for (int it = 0; it < 64 && chi - clo > DONE; ++it) {
    float base = clo == 0 ? 0.f : lo;
    float width = hi - base;
    float t1, t2;
    if (bisect) {
      t1 = t2 = base + width * 0.5f;
    } else {
      float f = 1.0f / (float)(chi - clo);
      t1 = base + width * ((float)(r - clo - SPAN) * f);
      t2 = base + width * ((float)(r - clo + SPAN) * f);
    }
    t1 = std::max(t1, lo); t2 = std::min(t2, hi);
    if (!(t1 > lo && t1 < hi)) t1 = lo + (hi - lo) * 0.5f;
    if (!(t2 > lo && t2 < hi)) t2 = lo + (hi - lo) * 0.5f;
    if (!(t1 > lo && t1 < hi)) break;  // (lo, hi] holds a single float value
    int c1, c2;
    count_le2(a, n, t1, t2, c1, c2);
    int before = chi - clo;
    if (c1 >= r) { hi = t1; chi = c1; } else { lo = t1; clo = c1; }
    if (t2 > lo && t2 < hi) {
      if (c2 >= r) { hi = t2; chi = c2; } else { lo = t2; clo = c2; }
    }
    bisect = (chi - clo) * 2 > before;
  }
  int m = 0;
  for (int j = 0; j < n; ++j) {  // branch-free gather of the candidates
    cand[m] = a[j];
    m += (a[j] > lo) & (a[j] <= hi);
  }
  int want = r - clo - 1;  // 0-based rank among candidates
  std::nth_element(cand, cand + want, cand + m);
  return cand[want];
}

// z = ahat * gamma + beta (two roundings, as torch), az = |z|; returns max |z|
inline float affine_abs(const float* ah, const float* g, const float* be, float* z, float* az, int M) {
  int j = 0;
  float mx = 0.f;
#if IIS_AVX2
  __m256 sign = _mm256_set1_ps(-0.0f), mv = _mm256_setzero_ps();
  for (; j + 8 <= M; j += 8) {
    __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(ah + j), _mm256_loadu_ps(g + j)), _mm256_loadu_ps(be + j));
    __m256 av = _mm256_andnot_ps(sign, v);
    _mm256_storeu_ps(z + j, v);
    _mm256_storeu_ps(az + j, av);
    mv = _mm256_max_ps(mv, av);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, mv);
  for (int i = 0; i < 8; ++i) mx = std::max(mx, t[i]);
#endif
  for (; j < M; ++j) {
    float p = ah[j] * g[j];
    z[j] = p + be[j];
    az[j] = std::fabs(z[j]);
    mx = std::max(mx, az[j]);
  }
  return mx;
}

// zi[j] = 0 where az[j] <= thr (dropped); returns the number kept
inline int mask_row(float* zi, const float* az, float thr, int M) {
  int kept = 0, j = 0;
#if IIS_AVX2
  __m256 tv = _mm256_set1_ps(thr);
  for (; j + 8 <= M; j += 8) {
    __m256 k = _mm256_cmp_ps(_mm256_loadu_ps(az + j), tv, _CMP_GT_OQ);
    kept += __builtin_popcount(_mm256_movemask_ps(k));
    _mm256_storeu_ps(zi + j, _mm256_and_ps(k, _mm256_loadu_ps(zi + j)));
  }
#endif
  for (; j < M; ++j) {
    bool keep = az[j] > thr;
    kept += keep;
    zi[j] = keep ? zi[j] : 0.f;
  }
  return kept;
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

// ------------------------------------------------------------------------------------------------------------
// Adam, torch.optim.Adam's arithmetic (no weight decay): m.lerp_(g, 1-b1); v = b2 v + (1-b2) g^2;
// denom = sqrt(v)/sqrt(bc2) + eps; p -= (m * lr/bc1) / denom
// ------------------------------------------------------------------------------------------------------------
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

// ------------------------------------------------------------------------------------------------------------
// per-thread scratch of one concept head
// ------------------------------------------------------------------------------------------------------------
struct HeadWs {
  Buf z, zrow, az, cand, logits, dz, dW, db, dg, dbe, val, cval, dots;
  std::vector<int32_t> rowptr, col, cptr, crow, fill;
};

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
  int64_t t = 0;
  int mode = -1;            // -1: choose per head from k; 0: all sparse; 1: all dense
  double dense_frac = 0.5;  // dense GEMM when kept entries >= dense_frac * M
  int row_block = 256;
  bool narrow = true;       // K <= 16 with AVX2: the register-resident row kernels of narrow.h

  Grid(py::dict params, py::dict moments, py::array ks_, py::array lr_probe_, py::array lr_head_) {
    py::array wp_a = params["wp"], w_a = params["w"];
    if (w_a.ndim() != 3) throw std::invalid_argument("w: expected [H, M, K]");
    if (wp_a.ndim() != 2) throw std::invalid_argument("wp: expected [D, L*K]");
    H = w_a.shape(0); M = w_a.shape(1); K = w_a.shape(2); D = wp_a.shape(0);
    if (K < 1 || M < 2 || D < 1 || H < 0) throw std::invalid_argument("bad grid dimensions");
    if (wp_a.shape(1) % K) throw std::invalid_argument("wp: second dim must be L*K");
    L = wp_a.shape(1) / K;
    auto bind = [&](py::dict d, const char* key, std::initializer_list<int64_t> shape) -> float* {
      if (!d.contains(key)) throw std::invalid_argument(std::string("missing array '") + key + "'");
      py::array a = d[key];
      float* p = checked<float>(a, key, shape, true);
      keep_.push_back(a);
      return p;
    };
    const int64_t LK = L * K;
    wp = bind(params, "wp", {D, LK}); bp = bind(params, "bp", {LK});
    w = bind(params, "w", {H, M, K}); b = bind(params, "b", {H, K});
    gam = bind(params, "gamma", {H, M}); bet = bind(params, "beta", {H, M});
    mwp = bind(moments, "m_wp", {D, LK}); vwp = bind(moments, "v_wp", {D, LK});
    mbp = bind(moments, "m_bp", {LK}); vbp = bind(moments, "v_bp", {LK});
    mw = bind(moments, "m_w", {H, M, K}); vw = bind(moments, "v_w", {H, M, K});
    mb = bind(moments, "m_b", {H, K}); vb = bind(moments, "v_b", {H, K});
    mg = bind(moments, "m_gamma", {H, M}); vg = bind(moments, "v_gamma", {H, M});
    mbe = bind(moments, "m_beta", {H, M}); vbe = bind(moments, "v_beta", {H, M});
    const int64_t* kp = checked<int64_t>(ks_, "ks", {H}, false);
    const double* lp = checked<double>(lr_probe_, "lr_probe", {L}, false);
    const double* lh = checked<double>(lr_head_, "lr_head", {H}, false);
    ks.assign(kp, kp + H);
    for (auto k : ks)
      if (k < 0 || k >= M) throw std::invalid_argument("ks: every threshold rank k must satisfy 0 <= k < M");
    lr_probe.assign(lp, lp + L);
    lr_head.assign(lh, lh + H);
  }

  bool head_dense(int64_t h) const {
    if (mode >= 0) return mode == 1;
    return (double)(M - ks[h] - 1) >= dense_frac * (double)M;
  }

  // one optimisation step of every head on rows idx of (x, ahat, y)
  void step(py::array x_, py::array ahat_, py::array y_, py::array idx_, double lr_scale, py::object debug,
            py::object dahat_) {
    const float* x = checked<float>(x_, "x", {-1, D}, false);
    int64_t N = x_.shape(0);
    const int64_t* y = checked<int64_t>(y_, "y", {N}, false);
    const int64_t* idx = checked<int64_t>(idx_, "idx", {-1}, false);
    int64_t nb = idx_.shape(0);
    if (nb < 1) throw std::invalid_argument("idx: empty batch");
    const bool per_head = ahat_.ndim() == 3;
    const float* ahat = per_head ? checked<float>(ahat_, "ahat", {H, nb, M}, false)
                                 : checked<float>(ahat_, "ahat", {N, M}, false);
    float* dahat = nullptr;
    if (!dahat_.is_none()) {
      if (!per_head) throw std::invalid_argument("dahat: only with per-head ahat [H, nb, M]");
      py::array d = dahat_.cast<py::array>();
      dahat = checked<float>(d, "dahat", {H, nb, M}, true);
    }
    for (int64_t i = 0; i < nb; ++i) {
      if (idx[i] < 0 || idx[i] >= N) throw std::invalid_argument("idx: row index out of range");
      if (y[idx[i]] < 0 || y[idx[i]] >= K) throw std::invalid_argument("y: label out of range [0, num_classes)");
    }
    DebugOut dbg;
    bool want_debug = !debug.is_none();
    py::dict dd;
    auto mk = [&](const char* key, std::vector<py::ssize_t> shape) -> float* {
      py::array_t<float> a(shape);
      std::fill(a.mutable_data(), a.mutable_data() + a.size(), 0.f);
      dd[key] = a;
      return a.mutable_data();
    };
    if (want_debug) {
      dd = debug.cast<py::dict>();
      dbg.probe_logits = mk("probe_logits", {nb, L * K});
      dbg.head_logits = mk("head_logits", {H, nb, K});
      dbg.dwp = mk("dwp", {D, L * K});
      dbg.dbp = mk("dbp", {L * K});
      dbg.dw = mk("dw", {H, M, K});
      dbg.db = mk("db", {H, K});
      dbg.dgamma = mk("dgamma", {H, M});
      dbg.dbeta = mk("dbeta", {H, M});
      dbg.loss_probe = mk("loss_probe", {L});
      dbg.loss_head = mk("loss_head", {H});
      py::array_t<int64_t> kept({H, nb});
      dd["kept"] = kept;
      dbg.kept = kept.mutable_data();
    }
    {
      py::gil_scoped_release nogil;
      ensure_ws();
      ++t;
      step_impl(x, ahat, per_head ? nb * M : 0, dahat, y, idx, nb, lr_scale, want_debug ? &dbg : nullptr);
    }
  }

  // number of correct top-1 predictions of every probe [L] and head [H] on (x, ahat, y)
  py::tuple evaluate(py::array x_, py::array ahat_, py::array y_) {
    const float* x = checked<float>(x_, "x", {-1, D}, false);
    int64_t N = x_.shape(0);
    const bool per_head = ahat_.ndim() == 3;
    const float* ahat = per_head ? checked<float>(ahat_, "ahat", {H, N, M}, false)
                                 : checked<float>(ahat_, "ahat", {N, M}, false);
    const int64_t* y = checked<int64_t>(y_, "y", {N}, false);
    py::array_t<int64_t> cp(L), ch(H);
    int64_t* cpp_ = cp.mutable_data();
    int64_t* chp = ch.mutable_data();
    {
      py::gil_scoped_release nogil;
      ensure_ws();
      eval_impl(x, ahat, per_head ? N * M : 0, y, N, cpp_, chp);
    }
    return py::make_tuple(cp, ch);
  }

 private:
  float *wp, *bp, *w, *b, *gam, *bet;
  float *mwp, *vwp, *mbp, *vbp, *mw, *vw, *mb, *vb, *mg, *vg, *mbe, *vbe;
  std::vector<py::array> keep_;
  std::vector<GemmWs> gws_;
  std::vector<HeadWs> hws_;
#if IIS_AVX2
  std::vector<narrow::Ws> nws_;
#endif
  Buf plog_, pdw_, pdb_;
  Buf xb_;                     // the batch's feature rows x[idx], contiguous
  Buf ab_;                     // narrow heads: the batch's ahat rows, gathered once per step for every head
  std::vector<int64_t> yb_;

  void ensure_ws() {
    size_t nt = (size_t)std::max(1, max_threads());
    if (gws_.size() < nt) gws_.resize(nt);
    if (hws_.size() < nt) hws_.resize(nt);
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

  // Masked z of rows [r0, r0+n) of head h: dense -> Z[n x M] (dropped entries 0); sparse -> CSR in ws.
  // Returns total kept entries. kept_out (optional) receives per-row counts.
  int64_t build_rows(int64_t h, const float* ahat, const int64_t* idx, int64_t r0, int n, bool dense, HeadWs& ws,
                     int64_t* kept_out) {
    const float* g = gam + h * M;
    const float* be = bet + h * M;
    const int r = (int)ks[h] + 1;
    const int Mi = (int)M;
    float* az = ws.az.get(M);
    float* cand = ws.cand.get(M);
    int64_t nnz = 0;
    if (dense) {
      float* Z = ws.z.get((size_t)row_block * M);
      for (int i = 0; i < n; ++i) {
        int64_t row = idx ? idx[r0 + i] : r0 + i;
        float* zi = Z + (int64_t)i * M;
        float amax = affine_abs(ahat + row * M, g, be, zi, az, Mi);
        float thr = kth_smallest(az, Mi, r, amax, cand);
        int kept = mask_row(zi, az, thr, Mi);
        nnz += kept;
        if (kept_out) kept_out[r0 + i] = kept;
      }
    } else {
      ws.rowptr.resize(row_block + 1);
      ws.col.resize((size_t)row_block * M + 1);
      int32_t* col = ws.col.data();
      float* val = ws.val.get((size_t)row_block * M + 1);
      float* zi = ws.zrow.get(M);
      ws.rowptr[0] = 0;
      for (int i = 0; i < n; ++i) {
        int64_t row = idx ? idx[r0 + i] : r0 + i;
        float amax = affine_abs(ahat + row * M, g, be, zi, az, Mi);
        float thr = kth_smallest(az, Mi, r, amax, cand);
        int64_t start = nnz;
        for (int j = 0; j < Mi; ++j) {
          col[nnz] = j;
          val[nnz] = zi[j];
          nnz += az[j] > thr;
        }
        ws.rowptr[i + 1] = (int32_t)nnz;
        if (kept_out) kept_out[r0 + i] = nnz - start;
      }
    }
    return nnz;
  }

  // logits of rows [r0, r0+n) of head h (bias included) into ws.logits [n x K]
  float* head_logits(int64_t h, int n, bool dense, HeadWs& ws, GemmWs& gw) {
    const float* W = w + h * M * K;
    const float* bias = b + h * K;
    float* Lg = ws.logits.get((size_t)row_block * K);
    if (dense) {
      float* Z = ws.z.p;
      gemm_serial(n, K, M, Mat{Z, M, 1}, Mat{W, K, 1}, Lg, K, false, gw);
      for (int i = 0; i < n; ++i) add_row(Lg + (int64_t)i * K, bias, (int)K);
    } else {
      const float* val = ws.val.p;
      for (int i = 0; i < n; ++i)
        sparse_axpy_row(Lg + (int64_t)i * K, bias, W, K, ws.col.data() + ws.rowptr[i], val + ws.rowptr[i],
                        ws.rowptr[i + 1] - ws.rowptr[i], (int)K);
    }
    return Lg;
  }

  // ahat rows: idx[i] of a shared ahat, or row i of this head's own block (aidx == nullptr). dah (optional):
  // this head's d loss / d ahat [nb, M], written in full.
  void head_train(int64_t h, const float* ahat, const int64_t* aidx, const int64_t* idx, const int64_t* y,
                  int64_t nb, float scale, float step_size, float bc2s, int tid, DebugOut* dbg, float* dah) {
    if (use_narrow() && dah == nullptr && aidx != nullptr) {
#if IIS_AVX2
      narrow_train(h, nb, scale, step_size, bc2s, nws_[tid], hws_[tid], dbg);
#endif
      return;
    }
    HeadWs& ws = hws_[tid];
    GemmWs& gw = gws_[tid];
    const bool dense = head_dense(h);
    const float* W = w + h * M * K;
    const int Ki = (int)K, Mi = (int)M;
    float* dW = ws.dW.get(M * K);
    float* db = ws.db.get(K);
    float* dg = ws.dg.get(M);
    float* dbe = ws.dbe.get(M);
    std::memset(dW, 0, sizeof(float) * M * K);
    std::memset(db, 0, sizeof(float) * K);
    std::memset(dg, 0, sizeof(float) * M);
    std::memset(dbe, 0, sizeof(float) * M);
    double loss = 0.0;
    for (int64_t r0 = 0; r0 < nb; r0 += row_block) {
      int n = (int)std::min<int64_t>(row_block, nb - r0);
      build_rows(h, ahat, aidx, r0, n, dense, ws, dbg ? dbg->kept + h * nb : nullptr);
      float* G = head_logits(h, n, dense, ws, gw);
      if (dbg) std::memcpy(dbg->head_logits + (h * nb + r0) * K, G, sizeof(float) * n * K);
      for (int i = 0; i < n; ++i) {
        loss += softmax_ce_row(G + (int64_t)i * K, nullptr, Ki, y[idx[r0 + i]], scale);
        add_row(db, G + (int64_t)i * K, Ki);
      }
      if (dense) {
        const float* Z = ws.z.p;
        gemm_serial(M, K, n, Mat{Z, 1, M}, Mat{G, K, 1}, dW, K, true, gw);  // dW += Z^T G
        float* dZ = ws.dz.get((size_t)row_block * M);
        gemm_serial(n, M, K, Mat{G, K, 1}, Mat{W, 1, K}, dZ, M, false, gw);  // dZ = G W^T
        for (int i = 0; i < n; ++i) {
          const int64_t ar = aidx ? aidx[r0 + i] : r0 + i;
          masked_grad_row(dg, dbe, Z + (int64_t)i * M, dZ + (int64_t)i * M, ahat + ar * M, Mi);
          if (dah) {  // d ahat = dz * gamma at kept entries (kept <=> z != 0), 0 elsewhere
            const float* zi = Z + (int64_t)i * M;
            const float* dzi = dZ + (int64_t)i * M;
            const float* g = gam + h * M;
            float* out = dah + (r0 + i) * M;
            for (int j = 0; j < Mi; ++j) out[j] = zi[j] != 0.f ? dzi[j] * g[j] : 0.f;
          }
        }
      } else {
        const int32_t* rp = ws.rowptr.data();
        const int32_t* col = ws.col.data();
        const float* val = ws.val.p;
        int64_t nnz = rp[n];
        float* dots = ws.dots.get(M);
        for (int i = 0; i < n; ++i) {  // dz at kept entries = G[i] . W[j]
          const float* ah = ahat + (aidx ? aidx[r0 + i] : r0 + i) * M;
          int ne = rp[i + 1] - rp[i];
          sparse_dots(dots, G + (int64_t)i * K, W, K, col + rp[i], ne, Ki);
          float* out = dah ? dah + (r0 + i) * M : nullptr;
          if (out) std::memset(out, 0, sizeof(float) * M);
          for (int e = 0; e < ne; ++e) {
            int j = col[rp[i] + e];
            dg[j] += dots[e] * ah[j];
            dbe[j] += dots[e];
            if (out) out[j] = dots[e] * gam[h * M + j];
          }
        }
        // transpose the kept pattern (CSC) so that dW[j] += sum_i z[i,j] G[i] accumulates in registers
        ws.cptr.assign(M + 1, 0);
        for (int64_t e = 0; e < nnz; ++e) ws.cptr[col[e] + 1]++;
        for (int j = 0; j < Mi; ++j) ws.cptr[j + 1] += ws.cptr[j];
        ws.crow.resize(std::max<int64_t>(nnz, 1));
        float* cval = ws.cval.get(std::max<int64_t>(nnz, 1));
        ws.fill.assign(ws.cptr.begin(), ws.cptr.end() - 1);
        for (int i = 0; i < n; ++i)
          for (int e = rp[i]; e < rp[i + 1]; ++e) {
            int pos = ws.fill[col[e]]++;
            ws.crow[pos] = i;
            cval[pos] = val[e];
          }
        for (int j = 0; j < Mi; ++j) {
          int ne = ws.cptr[j + 1] - ws.cptr[j];
          if (ne)
            sparse_axpy_row(dW + (int64_t)j * K, dW + (int64_t)j * K, G, K, ws.crow.data() + ws.cptr[j],
                            cval + ws.cptr[j], ne, Ki);
        }
      }
    }
    if (dbg) {
      std::memcpy(dbg->dw + h * M * K, dW, sizeof(float) * M * K);
      std::memcpy(dbg->db + h * K, db, sizeof(float) * K);
      std::memcpy(dbg->dgamma + h * M, dg, sizeof(float) * M);
      std::memcpy(dbg->dbeta + h * M, dbe, sizeof(float) * M);
      dbg->loss_head[h] = (float)(loss / (double)nb);
    }
    head_adam(h, dW, db, dg, dbe, step_size, bc2s);
  }

  void head_adam(int64_t h, const float* dW, const float* db, const float* dg, const float* dbe, float step_size,
                 float bc2s) {
    adam_update(w + h * M * K, mw + h * M * K, vw + h * M * K, dW, M * K, step_size, bc2s);
    adam_update(b + h * K, mb + h * K, vb + h * K, db, K, step_size, bc2s);
    adam_update(gam + h * M, mg + h * M, vg + h * M, dg, M, step_size, bc2s);
    adam_update(bet + h * M, mbe + h * M, vbe + h * M, dbe, M, step_size, bc2s);
  }

#if IIS_AVX2
  narrow::Head narrow_head(int64_t h) const {
    return narrow::Head{w + h * M * K, b + h * K, gam + h * M, bet + h * M, (int)M, (int)ks[h] + 1, head_dense(h),
                        row_block};
  }

  // head h on the batch gathered into ab_ / yb_ by step_impl
  void narrow_train(int64_t h, int64_t nb, float scale, float step_size, float bc2s, narrow::Ws& nw, HeadWs& ws,
                    DebugOut* dbg) {
    narrow::Grads gr{ws.dW.get(M * K), ws.db.get(K), ws.dg.get(M), ws.dbe.get(M)};
    if (dbg) {
      gr.dbg_logits = dbg->head_logits + h * nb * K;
      gr.dbg_kept = dbg->kept + h * nb;
    }
    double loss = narrow::train_fn((int)K)(narrow_head(h), ab_.p, yb_.data(), nb, scale, nw, gr);
    if (dbg) {
      std::memcpy(dbg->dw + h * M * K, gr.dW, sizeof(float) * M * K);
      std::memcpy(dbg->db + h * K, gr.db, sizeof(float) * K);
      std::memcpy(dbg->dgamma + h * M, gr.dg, sizeof(float) * M);
      std::memcpy(dbg->dbeta + h * M, gr.dbe, sizeof(float) * M);
      dbg->loss_head[h] = (float)(loss / (double)nb);
    }
    head_adam(h, gr.dW, gr.db, gr.dg, gr.dbe, step_size, bc2s);
  }
#endif

  // ahat_stride: 0 = one ahat [N, M] shared by every head (rows idx); else head h reads its own [nb, M] block at
  // ahat + h * ahat_stride (the batch's rows in order) and, with dahat, writes its d loss / d ahat there too.
  void step_impl(const float* x, const float* ahat, int64_t ahat_stride, float* dahat, const int64_t* y,
                 const int64_t* idx, int64_t nb, double lr_scale, DebugOut* dbg) {
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
      int tid = thread_id(), T = 1;
#ifdef _OPENMP
      T = omp_get_num_threads();
#endif
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
          gemm_serial(i1 - i0, LK, D, Mat{xb + i0 * D, D, 1}, Mat{wp, LK, 1}, P + i0 * LK, LK, false, gws_[tid]);
          if (dbg)
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t c = 0; c < LK; ++c) dbg->probe_logits[i * LK + c] = P[i * LK + c] + bp[c];
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t l = 0; l < L; ++l)
              lossp[tid * L + l] += softmax_ce_row(P + i * LK + l * K, bp + l * K, (int)K, y[idx[i]], scale);
        }
#pragma omp barrier
        // dwp = x[idx]^T G split in rectangles: by rows of D when the probes are narrow (each thread then packs
        // only its half of x[idx]^T, the large operand), else by columns (each thread packs only its half of G)
        const bool split_rows = LK < D;
        int64_t d0 = 0, d1 = D, c0 = 0, c1 = LK;
        if (split_rows) {
          int64_t rp = (D + MR - 1) / MR;
          d0 = std::min(D, rp * tid / T * MR), d1 = std::min(D, rp * (tid + 1) / T * MR);
        } else {
          int64_t cp = (LK + NR - 1) / NR;
          c0 = std::min(LK, cp * tid / T * NR), c1 = std::min(LK, cp * (tid + 1) / T * NR);
        }
        if (d1 > d0 && c1 > c0) {
          gemm_serial(d1 - d0, c1 - c0, nb, Mat{xb + d0, 1, D}, Mat{P + c0, LK, 1},
                      dwp + d0 * LK + c0, LK, false, gws_[tid]);
          if (dbg)
            for (int64_t d = d0; d < d1; ++d)
              std::memcpy(dbg->dwp + d * LK + c0, dwp + d * LK + c0, sizeof(float) * (c1 - c0));
          for (int64_t s0 = c0; s0 < c1;) {  // segments of one probe (one lr) each
            int64_t l = s0 / K, s1 = std::min(c1, (l + 1) * K);
            for (int64_t d = d0; d < d1; ++d)
              adam_update(wp + d * LK + s0, mwp + d * LK + s0, vwp + d * LK + s0, dwp + d * LK + s0, s1 - s0,
                          ssp[l], bc2s);
            s0 = s1;
          }
        }
        if (split_rows ? tid == 0 : c1 > c0) {  // the bias of columns c0..c1
          for (int64_t c = c0; c < c1; ++c) dbp[c] = 0.f;
          for (int64_t i = 0; i < nb; ++i) add_row(dbp + c0, P + i * LK + c0, (int)(c1 - c0));
          if (dbg) std::memcpy(dbg->dbp + c0, dbp + c0, sizeof(float) * (c1 - c0));
          for (int64_t s0 = c0; s0 < c1;) {
            int64_t l = s0 / K, s1 = std::min(c1, (l + 1) * K);
            adam_update(bp + s0, mbp + s0, vbp + s0, dbp + s0, s1 - s0, ssp[l], bc2s);
            s0 = s1;
          }
        }
      }
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t oi = 0; oi < H; ++oi) {
        int64_t h = order[oi];
        float ss = (float)(lr_head[h] * lr_scale / bc1);
        head_train(h, ahat + h * ahat_stride, ahat_stride ? nullptr : idx, idx, y, nb, scale, ss, bc2s, tid, dbg,
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

  void eval_impl(const float* x, const float* ahat_all, int64_t ahat_stride, const int64_t* y, int64_t N,
                 int64_t* cp, int64_t* ch) {
    const int64_t LK = L * K;
    const int nt = std::min((int)gws_.size(), std::max(1, max_threads()));
    const int64_t EB = 512;  // probe rows per block, per thread
    std::vector<int64_t> cnt(nt * std::max<int64_t>(L, 1), 0);
    std::vector<int64_t> order = head_order();
    if (L > 0) plog_.get(nt * EB * LK);
    const int64_t nblk = (N + EB - 1) / EB;
#pragma omp parallel num_threads(nt)
    {
      int tid = thread_id();
      if (L > 0) {
        float* P = plog_.p + tid * EB * LK;
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t blk = 0; blk < nblk; ++blk) {
          int64_t r0 = blk * EB, n = std::min(EB, N - r0);
          gemm_serial(n, LK, D, Mat{x + r0 * D, D, 1}, Mat{wp, LK, 1}, P, LK, false, gws_[tid]);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t l = 0; l < L; ++l)
              cnt[tid * L + l] += argmax_row(P + i * LK + l * K, bp + l * K, (int)K) == y[r0 + i];
        }
      }
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t oi = 0; oi < H; ++oi) {
        int64_t h = order[oi];
        const float* ahat = ahat_all + h * ahat_stride;
#if IIS_AVX2
        if (use_narrow()) {
          ch[h] = narrow::eval_fn((int)K)(narrow_head(h), ahat, y, N, nws_[tid]);
          continue;
        }
#endif
        HeadWs& ws = hws_[tid];
        bool dense = head_dense(h);
        int64_t c = 0;
        for (int64_t r0 = 0; r0 < N; r0 += row_block) {
          int n = (int)std::min<int64_t>(row_block, N - r0);
          build_rows(h, ahat, nullptr, r0, n, dense, ws, nullptr);
          float* Lg = head_logits(h, n, dense, ws, gws_[tid]);
          for (int i = 0; i < n; ++i) c += argmax_row(Lg + (int64_t)i * K, nullptr, (int)K) == y[r0 + i];
        }
        ch[h] = c;
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      cp[l] = 0;
      for (int th = 0; th < nt; ++th) cp[l] += cnt[th * L + l];
    }
  }
};

// ahat = LayerNorm(x C^T) without affine (the part every concept head shares), written into out [N, M]
void project(py::array x_, py::array c_, py::array out_) {
  if (x_.ndim() != 2 || c_.ndim() != 2) throw std::invalid_argument("project: x [N, D] and concepts [M, D] expected");
  int64_t N = x_.shape(0), D = x_.shape(1), M = c_.shape(0);
  const float* x = checked<float>(x_, "x", {N, D}, false);
  const float* C = checked<float>(c_, "concepts", {M, D}, false);
  float* out = checked<float>(out_, "out", {N, M}, true);
  py::gil_scoped_release nogil;
  std::vector<GemmWs> wss(std::max(1, max_threads()));
  const int64_t CH = 8192;
  for (int64_t r0 = 0; r0 < N; r0 += CH) {
    int64_t n = std::min(CH, N - r0);
    gemm(n, M, D, Mat{x + r0 * D, D, 1}, Mat{C, 1, D}, out + r0 * M, M, false, wss);
#pragma omp parallel for schedule(static)
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

// C = A B for float32 matrices (tests and the benchmark's throughput check of the GEMM itself)
py::array_t<float> matmul(py::array a_, py::array b_) {
  if (a_.ndim() != 2 || b_.ndim() != 2 || a_.shape(1) != b_.shape(0))
    throw std::invalid_argument("matmul: expected A [m, k] and B [k, n]");
  int64_t m = a_.shape(0), k = a_.shape(1), n = b_.shape(1);
  const float* A = checked<float>(a_, "A", {m, k}, false);
  const float* B = checked<float>(b_, "B", {k, n}, false);
  py::array_t<float> c({m, n});
  float* C = c.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::vector<GemmWs> wss(std::max(1, max_threads()));
    gemm(m, n, k, Mat{A, k, 1}, Mat{B, n, 1}, C, n, false, wss);
  }
  return c;
}

// r-th smallest value (1-based) of every row of a [rows, n] (tests of the selection)
py::array_t<float> kth_rows(py::array a_, int r) {
  if (a_.ndim() != 2) throw std::invalid_argument("kth_rows: expected [rows, n]");
  int64_t R = a_.shape(0), n = a_.shape(1);
  const float* a = checked<float>(a_, "a", {R, n}, false);
  if (r < 1 || r > n) throw std::invalid_argument("kth_rows: r must be in [1, n]");
  py::array_t<float> out(R);
  float* o = out.mutable_data();
  std::vector<float> cand(n), az(n);
  for (int64_t i = 0; i < R; ++i) {
    float mx = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      az[j] = std::fabs(a[i * n + j]);
      mx = std::max(mx, az[j]);
    }
    o[i] = kth_smallest(az.data(), (int)n, r, mx, cand.data());
  }
  return out;
}

}  // namespace

// One module per CPU level (setup.py names it; iis_fast/ops/cpu_level.py picks one at import).
#ifndef IIS_FAST_MODULE
#define IIS_FAST_MODULE _C
#endif
PYBIND11_MODULE(IIS_FAST_MODULE, m) {
  m.doc() = "iis_fast fused CPU kernels (grid training step, evaluation, projection)";
  py::class_<Grid>(m, "Grid")
      .def(py::init<py::dict, py::dict, py::array, py::array, py::array>(), py::arg("params"), py::arg("moments"),
           py::arg("ks"), py::arg("lr_probe"), py::arg("lr_head"))
      .def("step", &Grid::step, py::arg("x"), py::arg("ahat"), py::arg("y"), py::arg("idx"), py::arg("lr_scale"),
           py::arg("debug") = py::none(), py::arg("dahat") = py::none())
      .def("evaluate", &Grid::evaluate, py::arg("x"), py::arg("ahat"), py::arg("y"))
      .def("head_dense", &Grid::head_dense)
      .def_readwrite("t", &Grid::t)
      .def_readwrite("mode", &Grid::mode)
      .def_readwrite("dense_frac", &Grid::dense_frac)
      .def_readwrite("narrow", &Grid::narrow, "K <= 16: use the register-resident narrow-head kernels (narrow.h)")
      .def_property(
          "row_block", [](const Grid& g) { return g.row_block; },
          [](Grid& g, int v) {
            if (v < 1) throw std::invalid_argument("row_block must be >= 1");
            g.row_block = v;
          })
      .def_readonly("D", &Grid::D)
      .def_readonly("M", &Grid::M)
      .def_readonly("K", &Grid::K)
      .def_readonly("L", &Grid::L)
      .def_readonly("H", &Grid::H);
  m.def("project", &project, py::arg("x"), py::arg("concepts"), py::arg("out"));
  m.def("matmul", &matmul, py::arg("a"), py::arg("b"));
  m.def("kth_rows", &kth_rows, py::arg("a"), py::arg("r"));
  m.def("max_threads", &max_threads);
  m.attr("AVX2") = py::bool_(IIS_AVX2 != 0);
#ifdef _OPENMP
  m.attr("OPENMP") = py::bool_(true);
#else
  m.attr("OPENMP") = py::bool_(false);
#endif
}
