// bf16 x bf16 -> f32 matrix products through oneDNN's matmul primitive, as an XLA FFI handler.
//
// Why: on a CPU with AVX-512 BF16 but no AMX, XLA:CPU's bf16 dot runs no faster than its f32
// dot (~170-400 GFLOP/s on the 2-core EPYCs), while oneDNN's brgemm kernels (the ones torch's
// bf16 autocast calls) run ~2x that. The handler takes either operand transposed (as strides,
// never a copy), so the forward dot and both backward dots of a dense layer are one call each.
//
// One primitive per (M, N, K, transposes), created on first use and cached: creating one JITs
// a kernel (~1 ms), executing it costs microseconds. Threads: oneDNN's OpenMP runtime.

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include <Python.h>
#include <oneapi/dnnl/dnnl.hpp>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace onednn_matmul {

using dims = dnnl::memory::dims;
using dt = dnnl::memory::data_type;
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;  // aliases: a comma would split the macro's args
using F32Matrix = ffi::Buffer<ffi::F32, 2>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Row-major [rows, cols] descriptor, read transposed (column-major strides) when `trans`.
dnnl::memory::desc Desc(int64_t rows, int64_t cols, dt type, bool trans) {
  return dnnl::memory::desc({rows, cols}, type, trans ? dims{1, rows} : dims{cols, 1});
}

struct Matmul {
  dnnl::memory::desc a, b, c;
  dnnl::matmul primitive;
  std::string impl;
};

// C[M, N] = A[M, K] @ B[K, N]; A stored [K, M] when trans_a, B stored [N, K] when trans_b.
const Matmul& Get(int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool>, Matmul> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(m, n, k, trans_a, trans_b);
  auto it = cache.find(key);
  if (it == cache.end()) {
    Matmul mm{Desc(m, k, dt::bf16, trans_a), Desc(k, n, dt::bf16, trans_b),
              Desc(m, n, dt::f32, false), {}, {}};
    dnnl::matmul::primitive_desc pd(Engine(), mm.a, mm.b, mm.c);
    mm.primitive = dnnl::matmul(pd);
    mm.impl = pd.impl_info_str();
    it = cache.emplace(key, std::move(mm)).first;  // std::map: references stay valid
  }
  return it->second;
}

ffi::Error MatmulImpl(Bf16Matrix a, Bf16Matrix b, ffi::Result<F32Matrix> c, bool trans_a,
                      bool trans_b) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t kb = trans_b ? bd[1] : bd[0], n = trans_b ? bd[0] : bd[1];
  if (k != kb) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn bf16 matmul: contracting sizes differ (" + std::to_string(k) +
                          " vs " + std::to_string(kb) + ")");
  }
  try {
    const Matmul& mm = Get(m, n, k, trans_a, trans_b);
    dnnl::memory am(mm.a, Engine(), a.untyped_data()), bm(mm.b, Engine(), b.untyped_data()),
        cm(mm.c, Engine(), c->untyped_data());
    dnnl::stream stream(Engine());
    mm.primitive.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("onednn bf16 matmul failed: ") + e.what() +
                          " (this CPU may lack a bf16 matmul in oneDNN; use matmul: xla)");
  }
  return ffi::Error::Success();
}

}  // namespace onednn_matmul

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMatmulBf16, onednn_matmul::MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<onednn_matmul::Bf16Matrix>()
                                  .Arg<onednn_matmul::Bf16Matrix>()
                                  .Ret<onednn_matmul::F32Matrix>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

// ---- CPython module ----------------------------------------------------------------------------

static PyObject* registrations(PyObject*, PyObject*) {
  PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(OnednnMatmulBf16), nullptr, nullptr);
  if (!capsule) return nullptr;
  PyObject* out = Py_BuildValue("{s:N}", "jaxrl_onednn_matmul_bf16", capsule);
  return out;
}

// The kernel oneDNN picks for one shape ("brg:avx512_core_bf16", "brg:avx512_core_amx", ...),
// so a benchmark or a test can say what ran; raises RuntimeError where none is implemented.
static PyObject* implementation(PyObject*, PyObject* args) {
  long long m, n, k;
  int trans_a = 0, trans_b = 0;
  if (!PyArg_ParseTuple(args, "LLL|pp", &m, &n, &k, &trans_a, &trans_b)) return nullptr;
  try {
    return PyUnicode_FromString(onednn_matmul::Get(m, n, k, trans_a, trans_b).impl.c_str());
  } catch (const dnnl::error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

static PyObject* version(PyObject*, PyObject*) {
  const dnnl_version_t* v = dnnl_version();
  return PyUnicode_FromFormat("%d.%d.%d", v->major, v->minor, v->patch);
}

static PyMethodDef kMethods[] = {
    {"registrations", registrations, METH_NOARGS, "FFI target name -> PyCapsule of the handler."},
    {"implementation", implementation, METH_VARARGS,
     "implementation(m, n, k, trans_a=False, trans_b=False): the oneDNN kernel for that shape."},
    {"version", version, METH_NOARGS, "The oneDNN version this module runs on."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_onednn", nullptr, -1, kMethods};

PyMODINIT_FUNC PyInit__onednn() { return PyModule_Create(&kModule); }
