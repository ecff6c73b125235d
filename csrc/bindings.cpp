// iis_fast._C_<level>: the Python face of the CPU kernels (grid.h, project.h, select.h). The only file that
// includes pybind11: every array is checked here (dtype, shape, C-contiguity, writeability: a ValueError, never
// a kernel reading out of bounds), then the kernels run without the GIL on raw pointers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "grid.h"
#include "project.h"
#include "select.h"

namespace py = pybind11;
using namespace iis;

namespace {

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

// The parameter and moment arrays of a grid (checked; kept alive in `keep`) and its constants.
GridArrays grid_arrays(py::dict params, py::dict moments, py::array ks_, py::array lr_probe_, py::array lr_head_,
                       std::vector<py::array>& keep) {
  py::array wp_a = params["wp"], w_a = params["w"];
  if (w_a.ndim() != 3) throw std::invalid_argument("w: expected [H, M, K]");
  if (wp_a.ndim() != 2) throw std::invalid_argument("wp: expected [D, L*K]");
  GridArrays g;
  g.H = w_a.shape(0); g.M = w_a.shape(1); g.K = w_a.shape(2); g.D = wp_a.shape(0);
  const int64_t D = g.D, M = g.M, K = g.K, H = g.H;
  if (K < 1 || M < 2 || D < 1 || H < 0) throw std::invalid_argument("bad grid dimensions");
  if (wp_a.shape(1) % K) throw std::invalid_argument("wp: second dim must be L*K");
  g.L = wp_a.shape(1) / K;
  const int64_t L = g.L, LK = L * K;
  auto bind = [&](py::dict d, const char* key, std::initializer_list<int64_t> shape) -> float* {
    if (!d.contains(key)) throw std::invalid_argument(std::string("missing array '") + key + "'");
    py::array a = d[key];
    float* p = checked<float>(a, key, shape, true);
    keep.push_back(a);
    return p;
  };
  g.wp = bind(params, "wp", {D, LK}); g.bp = bind(params, "bp", {LK});
  g.w = bind(params, "w", {H, M, K}); g.b = bind(params, "b", {H, K});
  g.gam = bind(params, "gamma", {H, M}); g.bet = bind(params, "beta", {H, M});
  g.mwp = bind(moments, "m_wp", {D, LK}); g.vwp = bind(moments, "v_wp", {D, LK});
  g.mbp = bind(moments, "m_bp", {LK}); g.vbp = bind(moments, "v_bp", {LK});
  g.mw = bind(moments, "m_w", {H, M, K}); g.vw = bind(moments, "v_w", {H, M, K});
  g.mb = bind(moments, "m_b", {H, K}); g.vb = bind(moments, "v_b", {H, K});
  g.mg = bind(moments, "m_gamma", {H, M}); g.vg = bind(moments, "v_gamma", {H, M});
  g.mbe = bind(moments, "m_beta", {H, M}); g.vbe = bind(moments, "v_beta", {H, M});
  g.ks = checked<int64_t>(ks_, "ks", {H}, false);
  g.lr_probe = checked<double>(lr_probe_, "lr_probe", {L}, false);
  g.lr_head = checked<double>(lr_head_, "lr_head", {H}, false);
  for (int64_t h = 0; h < H; ++h)
    if (g.ks[h] < 0 || g.ks[h] >= M) throw std::invalid_argument("ks: every threshold rank k must satisfy 0 <= k < M");
  return g;
}

struct Keep {  // initialised before the Grid base (declaration order), which reads the arrays it holds
  std::vector<py::array> arrays;
};

// iis_fast._C.Grid: Grid (grid.h) built from dicts of numpy arrays, with checked step / evaluate.
class PyGrid : private Keep, public Grid {
 public:
  PyGrid(py::dict params, py::dict moments, py::array ks, py::array lr_probe, py::array lr_head)
      : Keep{}, Grid(grid_arrays(params, moments, ks, lr_probe, lr_head, Keep::arrays)) {}

  // one optimisation step of every head on rows idx of (x, ahat, y); debug (a dict): filled with the step's
  // logits, gradients, losses and kept counts
  void py_step(py::array x_, py::array ahat_, py::array y_, py::array idx_, double lr_scale, py::object debug,
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
    py::gil_scoped_release nogil;
    step(x, ahat, per_head ? nb * M : 0, dahat, y, idx, nb, lr_scale, want_debug ? &dbg : nullptr);
  }

  // number of correct top-1 predictions of every probe [L] and head [H] on (x, ahat, y)
  py::tuple py_evaluate(py::array x_, py::array ahat_, py::array y_) {
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
      evaluate(x, ahat, per_head ? N * M : 0, y, N, cpp_, chp);
    }
    return py::make_tuple(cp, ch);
  }
};

// ahat = LayerNorm(x C^T) without affine (the part every concept head shares), written into out [N, M]
void py_project(py::array x_, py::array c_, py::array out_) {
  if (x_.ndim() != 2 || c_.ndim() != 2) throw std::invalid_argument("project: x [N, D] and concepts [M, D] expected");
  int64_t N = x_.shape(0), D = x_.shape(1), M = c_.shape(0);
  const float* x = checked<float>(x_, "x", {N, D}, false);
  const float* C = checked<float>(c_, "concepts", {M, D}, false);
  float* out = checked<float>(out_, "out", {N, M}, true);
  py::gil_scoped_release nogil;
  project(x, C, out, N, D, M);
}

// r-th smallest |a| (1-based) of every row of a [rows, n] (tests of the selection, select.h)
py::array_t<float> kth_rows(py::array a_, int r) {
  if (a_.ndim() != 2) throw std::invalid_argument("kth_rows: expected [rows, n]");
  int64_t R = a_.shape(0), n = a_.shape(1);
  const float* a = checked<float>(a_, "a", {R, n}, false);
  if (r < 1 || r > n) throw std::invalid_argument("kth_rows: r must be in [1, n]");
  py::array_t<float> out(R);
  float* o = out.mutable_data();
  const int M = (int)n, Mp = pad8(M);
  Buf zb, azb, candb;
  float *z = zb.get(Mp), *az = azb.get(Mp), *cand = candb.get(Mp + 8);
  std::vector<float> ones(n, 1.f), zeros(n, 0.f);
  SelState st;
  for (int64_t i = 0; i < R; ++i) {  // |a| as the affine 1 * a + 0 (exact), padded as the head kernels pad it
    float amax = affine_abs(a + i * n, ones.data(), zeros.data(), M, nullptr, z, az);
    o[i] = select_rth(az, Mp, M, r, amax, st, cand);
  }
  return out;
}

}  // namespace

// One module per CPU level (setup.py names it; iis_fast/backends/cpu_level.py picks one at import).
#ifndef IIS_FAST_MODULE
#define IIS_FAST_MODULE _C
#endif
PYBIND11_MODULE(IIS_FAST_MODULE, m) {
  m.doc() = "iis_fast fused CPU kernels (grid training step, evaluation, projection)";
  py::class_<PyGrid>(m, "Grid")
      .def(py::init<py::dict, py::dict, py::array, py::array, py::array>(), py::arg("params"), py::arg("moments"),
           py::arg("ks"), py::arg("lr_probe"), py::arg("lr_head"))
      .def("step", &PyGrid::py_step, py::arg("x"), py::arg("ahat"), py::arg("y"), py::arg("idx"), py::arg("lr_scale"),
           py::arg("debug") = py::none(), py::arg("dahat") = py::none())
      .def("evaluate", &PyGrid::py_evaluate, py::arg("x"), py::arg("ahat"), py::arg("y"))
      .def("head_dense", [](const PyGrid& g, int64_t h) { return g.head_dense(h); })
      .def_readwrite("t", &PyGrid::t)
      .def_readwrite("mode", &PyGrid::mode)
      .def_readwrite("dense_frac", &PyGrid::dense_frac)
      .def_readwrite("narrow", &PyGrid::narrow, "K <= 16: use the register-resident narrow-head kernels (narrow.h)")
      .def_property(
          "row_block", [](const PyGrid& g) { return g.row_block; },
          [](PyGrid& g, int v) {
            if (v < 1) throw std::invalid_argument("row_block must be >= 1");
            g.row_block = v;
          })
      .def_readonly("D", &PyGrid::D)
      .def_readonly("M", &PyGrid::M)
      .def_readonly("K", &PyGrid::K)
      .def_readonly("L", &PyGrid::L)
      .def_readonly("H", &PyGrid::H);
  m.def("project", &py_project, py::arg("x"), py::arg("concepts"), py::arg("out"));
  m.def("kth_rows", &kth_rows, py::arg("a"), py::arg("r"));
  m.def("max_threads", &max_threads);
  m.attr("AVX2") = py::bool_(IIS_AVX2 != 0);
#ifdef _OPENMP
  m.attr("OPENMP") = py::bool_(true);
#else
  m.attr("OPENMP") = py::bool_(false);
#endif
}
