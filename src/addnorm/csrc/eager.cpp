// The eager CPU path of a small DyT, ScaleNorm or RMSNorm (and add+RMSNorm) call, of a
// LayerNorm (and add+LayerNorm) below functional's bounds, and of a channels-last
// GroupNorm, in C++: the autograd node and the kernel call without Python between them.
//
// In Python a small call pays for its layers: an autograd.Function's C apply alone costs
// ~3 µs, and the whole forward of a DyT over 64 values recording its graph ~12 µs, where
// torch's four ops (w * tanh(a * x) + b) take ~8.  Here the same numba kernels (the C
// entry points at the end of kernels/cpu.py, compiled by numba as C functions and handed
// over by address) run behind torch's C++ autograd::Function: this file's call of that
// DyT takes ~1.6 µs under no_grad and ~3.8 recording its graph, the whole functional call
// ~4.5 and ~6.5 (torch's ops ~5.7 and ~7.6; 2-core AMD EPYC); an RMSNorm of one decoding
// token (1, 4096) ~1.9 µs here, 4.7 the functional call, 6.4 the module (torch.nn's
// 13.7), 9.2 the module recording its graph (16.4 before, torch.nn's 18.1).  Python keeps
// the rest: the argument checks before the call (functional), the differentiable
// backward (create_graph=True, a batched or wrapped gradient, a dispatch mode: the
// reference's torch ops, called back), RMSNorm's whole backward (ops._row_norm_gradients,
// called back: its kernel has 28 variants to compile, and forward+backward is already
// 1.6x torch's), and every call this file turns down, for which it returns None: another
// device, dtype or layout, parameters of another dtype than x, work that is worth
// threads (serial_below elements and more; but DyT's and ScaleNorm's below 32 MB, whose
// rows this file shares out to torch's threads: there the Python path's
// autograd.Function cost ~7 µs of a 20 µs call; DyT's backward there is numba's threaded
// kernel, called back; and LayerNorm's, from 16K elements).  A LayerNorm that records its
// graph is served on functional's rule alone (``layer_norm``: its node's backward is
// torch's kernel); a forced numba backend gets the Python path's node (``row_norm``
// turns it down).  GroupNorm's channels-last calls are large (a UNet's, 1-3 MB): there
// Python's layers cost more than their few µs each, because the kernel before them has
// evicted them from the caches: the whole Python path of a recorded float16 2x640x32x32
// call took ~70 µs besides its ~190 µs kernel (Intel Xeon, 2 cores), torch's own ~20.

// the headers this file uses, not <torch/extension.h>: that one brings all of torch's C++
// frontend (modules, optimizers, data loaders) and took most of the compiler's ~30 s
#include <ATen/Parallel.h>
#include <ATen/TracerMode.h>
#include <ATen/ops/add.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/ones.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// kernels/cpu.py's C entry points (``C_SIGNATURES``), set by ``register_kernels``
using DytForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
using DytBackward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t);
using ScaleNormForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double);
using ScaleNormBackward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, double);
using RmsNormForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                double, double, int64_t, int64_t);
using LayerNormForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, double, double, int64_t);
using GroupNormForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, double);

struct Kernels {
  DytForward dyt_forward = nullptr;
  DytBackward dyt_backward = nullptr;
  ScaleNormForward scale_norm_forward = nullptr;
  ScaleNormBackward scale_norm_backward = nullptr;
  RmsNormForward rms_norm_forward = nullptr;
  LayerNormForward layer_norm_forward = nullptr;
  GroupNormForward group_norm_cl_forward = nullptr;
  int64_t serial_below = 0;  // elements: kernels/cpu.py's C_SERIAL_BELOW
  // bytes of x from which ScaleNorm takes the Python path (kernels/cpu.py's
  // _FRESH_MMAP_BYTES: there its outputs come on huge pages)
  int64_t python_from = 0;
  const int64_t* forked = nullptr;  // non-zero in a child forked from this process (_torch_threads)
  // torch's OpenMP runtime (null where there is none): ``over_rows``
  void (*omp_parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*omp_thread_num)() = nullptr;
  int (*omp_num_threads)() = nullptr;
  int64_t row_block = 32;    // rows per partial sum of DyT's parameter gradients (_ROW_BLOCK)
  // values per vector of torch's CPU sum of float32 and of float64 (RMSNorm's
  // torch-order sums, kernels/cpu.py's ``_torch_lanes``); 0: none matched, the kernel's
  // own order
  int64_t float_lanes = 0, double_lanes = 0;
};
Kernels kernels;

// The reference's differentiable backward of each op, called with the incoming gradient
// and the saved tensors (ops.py's ``_dyt_backward_math``, ``_scale_norm_backward_math``,
// set by ``register_math``); held for the life of the process.
py::object* dyt_backward_math = nullptr;
py::object* dyt_backward_threaded = nullptr;  // ops.py's ``_dyt_backward_threaded``: numba's, across threads
py::object* scale_norm_backward_math = nullptr;
py::object* row_norm_backward_math = nullptr;
py::object* group_norm_backward_math = nullptr;  // ops.py's ``_group_norm_grads``: numba's, or the reference's

// dtype code of the C entry points (kernels/cpu.py's ``C_DTYPES``), -1: not served here
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: return -1;
  }
}

int64_t address(const Tensor& t) { return t.defined() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0; }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A dense CPU tensor of dtype t and nothing else: no functorch or Python wrapper, no
// conjugate or negative bit, not sparse (its dispatch keys beyond those every CPU tensor
// has: autograd's, autocast's, ADInplaceOrView).
bool plain(const Tensor& x, at::ScalarType t) {
  static const c10::DispatchKeySet allowed =
      c10::DispatchKeySet({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutocastCPU}) |
      c10::autograd_dispatch_keyset;
  return x.scalar_type() == t && (x.key_set() - allowed) == c10::DispatchKeySet(c10::BackendComponent::CPUBit);
}

c10::optional<Tensor> maybe(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

bool optional_plain(const Tensor& p, at::ScalarType t) { return !p.defined() || plain(p, t); }

// An absent parameter, or a plain contiguous vector of n values of dtype t (a row norm's
// weight or bias over its d values, GroupNorm's over its C channels)
bool optional_vector(const Tensor& p, at::ScalarType t, int64_t n) {
  return !p.defined() || (plain(p, t) && p.dim() == 1 && p.size(0) == n && p.is_contiguous());
}

// Whether a backward must be made of torch ops (ops.py's ``_differentiable_backward``,
// and what its ``_traced`` hands to the custom op): autograd records it
// (create_graph=True), a functorch transform runs, a dispatch mode watches (FakeTensorMode,
// FlopCounterMode: no kernel can read a fake tensor, and a mode sees only torch ops), or
// the gradient is no plain tensor (vmap's batched one).
bool needs_math(const Tensor& dy) {
  return c10::GradMode::is_enabled() ||
         c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         c10::impl::TorchDispatchModeTLS::stack_len() > 0 || !plain(dy, dy.scalar_type());
}

py::object as_py(const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }
py::object as_py(double v) { return py::float_(v); }
py::object as_py(bool v) { return py::bool_(v); }
py::object as_py(int64_t v) { return py::int_(v); }
py::object as_py(const char* v) { return py::str(v); }
py::object as_py(const std::vector<bool>& v) { return py::cast(v); }

// math(args...) in Python: a tuple of gradients, None for an absent one
template <typename... Args>
variable_list call_math(const py::object* math, const Args&... args) {
  py::gil_scoped_acquire gil;
  py::tuple out = (*math)(as_py(args)...);
  variable_list grads;
  for (const auto& g : out) grads.push_back(g.is_none() ? Tensor() : g.cast<Tensor>());
  return grads;
}

// Whether something but plain eager execution would see a call (functional.py's
// ``_transformed``, for the callers that come here before it): a functorch transform runs,
// torch.jit.trace records (neither sees what a kernel here writes), or a forward-AD level
// is open (a tangent would pass through a kernel here unseen; any level open, whether
// these tensors carry tangents or not: the Python path then sorts them out)
bool transformed() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         at::tracer::impl::is_dispatch_enabled() || torch::autograd::ForwardADLevel::try_get_by_idx(0) != nullptr;
}

bool recording(std::initializer_list<Tensor> inputs) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// ---------------------------------------------------------------------------
// Rows across torch's threads (DyT's and ScaleNorm's forward, ScaleNorm's backward).
// ---------------------------------------------------------------------------

// Whether f(lo, hi) over rows can go across threads here (``over_rows``)
bool threaded() { return kernels.omp_parallel != nullptr && !*kernels.forked; }

// f(lo, hi) on rows [0, n) of d values: at once on this thread below serial_below
// elements, else a contiguous range of rows on each of torch's threads: a team started by
// GOMP_parallel of the OpenMP runtime torch runs on (its threads, already awake, as
// numba's kernels do: kernels/_torch_threads.py).  (at::parallel_for would run serially:
// its OpenMP loop is inline in torch's headers, and this file is built without -fopenmp,
// whose runtime could be another than torch's.)  Not in a forked child, where OpenMP has
// no threads to start (torch's own ops hang there).
template <typename F>
void over_rows(int64_t n, int64_t d, const F& f, int64_t serial_below = kernels.serial_below) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (n * d < serial_below || threads <= 1 || !threaded()) {
    f(0, n);
    return;
  }
  struct Task {
    const F* f;
    int64_t n;
  } task{&f, n};
  kernels.omp_parallel(
      [](void* data) {
        const Task& t = *static_cast<Task*>(data);
        const int64_t i = kernels.omp_thread_num(), k = kernels.omp_num_threads();
        const int64_t lo = t.n * i / k, hi = t.n * (i + 1) / k;
        if (lo < hi) (*t.f)(lo, hi);
      },
      &task, static_cast<unsigned>(threads), 0);
}

// Whether x's size is one this file serves by rows or samples (DyT's, ScaleNorm's and
// GroupNorm's calls): below serial_below elements on this thread, else across threads
// where it can start them, below python_from bytes (from there the Python path's outputs
// come on huge pages)
bool rows_sized(const Tensor& x) {
  return (x.numel() < kernels.serial_below || threaded()) &&
         x.numel() * static_cast<int64_t>(x.element_size()) < kernels.python_from;
}

// t's storage from row lo on, rows of d values
int64_t row_address(const Tensor& t, int64_t lo, int64_t d) {
  return t.defined() ? address(t) + lo * d * static_cast<int64_t>(t.element_size()) : 0;
}

// ---------------------------------------------------------------------------
// DyT: y = w * tanh(alpha * x) + b over rows x (n, d); alpha (1,), w and b (d,) or absent.
// ---------------------------------------------------------------------------

Tensor dyt_run(const Tensor& x, const Tensor& alpha, const Tensor& w, const Tensor& b) {
  Tensor y = torch::empty_like(x);
  const int64_t d = x.size(1), code = dtype_code(x.scalar_type());
  over_rows(x.size(0), d, [&](int64_t lo, int64_t hi) {
    kernels.dyt_forward(code, hi - lo, d, row_address(x, lo, d), address(alpha), address(w), address(b),
                        row_address(y, lo, d));
  });
  return y;
}

// (an absent weight or bias travels as an empty optional: autograd takes an undefined
// tensor among a node's inputs for a tensor, and fails on its device)
struct DyT : public torch::autograd::Function<DyT> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& alpha,
                        const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias) {
    const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
    ctx->save_for_backward({x, alpha, w, b});
    return dyt_run(x, alpha, w, b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &alpha = saved[1], &w = saved[2], &b = saved[3];
    Tensor dy = grads[0];
    if (needs_math(dy)) return call_math(dyt_backward_math, dy, x, alpha, w, b);
    const int64_t n = x.size(0), d = x.size(1), blocks = (n + kernels.row_block - 1) / kernels.row_block;
    // work worth threads: numba's backward across them (its sums per block of rows then
    // run in one order whatever the split), called back in Python
    if (n * d >= kernels.serial_below) return call_math(dyt_backward_threaded, dy, x, alpha, w, b);
    dy = dy.contiguous();  // (autograd gives it the output's dtype)
    Tensor dx = torch::empty_like(x), dalpha = torch::empty_like(alpha);
    Tensor part = torch::empty({3, blocks, d}, x.options().dtype(acc_type(x.scalar_type())));
    Tensor dw = w.defined() ? torch::empty_like(w) : Tensor();
    Tensor db = b.defined() ? torch::empty_like(b) : Tensor();
    kernels.dyt_backward(dtype_code(x.scalar_type()), n, d, blocks, address(dy), address(x), address(alpha),
                         address(w), address(dx), address(part), address(dalpha), address(dw), address(db));
    return {dx, dalpha, dw, db};
  }
};

// None where this path does not serve the call (see the top of the file)
py::object dyt(const Tensor& x, const Tensor& alpha, const c10::optional<Tensor>& weight,
               const c10::optional<Tensor>& bias) {
  const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  const at::ScalarType t = x.scalar_type();
  if (kernels.dyt_forward == nullptr || dtype_code(t) < 0 || x.dim() != 2 || !rows_sized(x) || !x.is_contiguous() ||
      !plain(x, t) || !plain(alpha, t) || alpha.numel() != 1 || !optional_plain(w, t) || !optional_plain(b, t))
    return py::none();
  const Tensor wc = w.defined() ? w.contiguous() : w, bc = b.defined() ? b.contiguous() : b;
  if ((wc.defined() && wc.numel() != x.size(1)) || (bc.defined() && bc.numel() != x.size(1))) return py::none();
  if (recording({x, alpha, wc, bc})) return py::cast(DyT::apply(x, alpha, maybe(wc), maybe(bc)));
  return py::cast(dyt_run(x, alpha, wc, bc));
}

// ---------------------------------------------------------------------------
// ScaleNorm: y = g * x / max(||x||, eps) over rows x (n, d); g (1,).
// ---------------------------------------------------------------------------

Tensor scale_norm_run(const Tensor& x, const Tensor& g, double eps, Tensor* rnorm) {
  Tensor y = torch::empty_like(x);
  const int64_t n = x.size(0), d = x.size(1), code = dtype_code(x.scalar_type());
  if (rnorm != nullptr) *rnorm = torch::empty({n}, x.options().dtype(acc_type(x.scalar_type())));
  const Tensor r = rnorm != nullptr ? *rnorm : Tensor();
  over_rows(n, d, [&](int64_t lo, int64_t hi) {
    kernels.scale_norm_forward(code, hi - lo, d, row_address(x, lo, d), address(g), row_address(y, lo, d),
                               row_address(r, lo, 1), eps);
  });
  return y;
}

struct ScaleNorm : public torch::autograd::Function<ScaleNorm> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& g, double eps) {
    Tensor rnorm;
    Tensor y = scale_norm_run(x, g, eps, &rnorm);
    ctx->save_for_backward({x, g, rnorm});
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &g = saved[1], &rnorm = saved[2];
    const double eps = ctx->saved_data["eps"].toDouble();
    Tensor dy = grads[0];
    if (needs_math(dy)) {
      variable_list out = call_math(scale_norm_backward_math, dy, x, g, eps);
      return {out[0], out[1], Tensor()};
    }
    dy = dy.contiguous();  // (autograd gives it the output's dtype)
    const int64_t n = x.size(0), d = x.size(1);
    Tensor dx = torch::empty_like(x);
    Tensor dots = torch::empty({n}, x.options().dtype(at::kDouble));  // per row, summed in order below
    const int64_t code = dtype_code(x.scalar_type());
    over_rows(n, d, [&](int64_t lo, int64_t hi) {
      kernels.scale_norm_backward(code, hi - lo, d, row_address(dy, lo, d), row_address(x, lo, d), address(g),
                                  row_address(rnorm, lo, 1), row_address(dx, lo, d), row_address(dots, lo, 1), eps);
    });
    return {dx, dots.sum().reshape(g.sizes()).to(g.scalar_type()), Tensor()};
  }
};

// (y, None), ops.scale_norm's eager contract; None where this path does not serve the call
py::object scale_norm(const Tensor& x, const Tensor& g, double eps) {
  const at::ScalarType t = x.scalar_type();
  if (kernels.scale_norm_forward == nullptr || dtype_code(t) < 0 || x.dim() != 2 || !rows_sized(x) ||
      !x.is_contiguous() || !plain(x, t) || !plain(g, t) || g.numel() != 1)
    return py::none();
  Tensor y = recording({x, g}) ? ScaleNorm::apply(x, g, eps) : scale_norm_run(x, g, eps, nullptr);
  return py::make_tuple(y, py::none());
}

// ---------------------------------------------------------------------------
// The row norms, with or without the fused residual add, over rows of x's last dim (d
// values), any leading shape: r = x + residual; RMSNorm y = r * rstd * (w + offset), w (d,)
// or absent; LayerNorm y = (r - mean) * rstd * w + b, w and b (d,) or absent.
// ---------------------------------------------------------------------------

// Whether this file serves a row norm of these arguments: x of a C dtype, contiguous,
// plain, below serial_below elements (more is worth threads: the Python path), or where
// its rows can go ``across_threads`` (LayerNorm's), of a size ``rows_sized`` takes; the
// parameters and the residual of x's dtype and layout (parameters (d,), the residual x's
// shape)
bool rows_served(const Tensor& x, const Tensor& res, const Tensor& w, const Tensor& b, bool across_threads) {
  const at::ScalarType t = x.scalar_type();
  return dtype_code(t) >= 0 && x.dim() > 0 && x.size(-1) > 0 &&
         (across_threads ? rows_sized(x) : x.numel() < kernels.serial_below) && x.is_contiguous() &&
         plain(x, t) && optional_vector(w, t, x.size(-1)) && optional_vector(b, t, x.size(-1)) &&
         (!res.defined() || (plain(res, t) && res.sizes() == x.sizes() && res.is_contiguous()));
}

constexpr int64_t torch_order = 4;  // reference.TORCH_ORDER: a bit of ``cast``
constexpr int64_t rounding = 3;     // reference.ROUNDING: the others

struct RmsOutputs {
  Tensor y, r, rstd;
};

RmsOutputs rms_norm_run(const Tensor& x, const Tensor& residual, const Tensor& w, double eps, double offset,
                        int64_t cast, bool stats) {
  const int64_t d = x.size(-1), n = x.numel() / d;
  RmsOutputs out{torch::empty_like(x), residual.defined() ? torch::empty_like(x) : Tensor(),
                 stats ? torch::empty({n}, x.options().dtype(acc_type(x.scalar_type()))) : Tensor()};
  kernels.rms_norm_forward(dtype_code(x.scalar_type()), n, d, address(x), address(residual), address(w),
                           address(out.y), address(out.r), address(out.rstd), eps, offset, cast & rounding,
                           !(cast & torch_order)           ? 0
                           : x.scalar_type() == at::kDouble ? kernels.double_lanes
                                                            : kernels.float_lanes);
  return out;
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  // outputs: y, and r where there is a residual
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& residual,
                               const c10::optional<Tensor>& weight, double eps, double offset, int64_t cast) {
    const Tensor res = residual.value_or(Tensor()), w = weight.value_or(Tensor());
    RmsOutputs out = rms_norm_run(x, res, w, eps, offset, cast, true);
    // the rows normalized; an input made under torch.inference_mode, normalized with a
    // trainable weight, copied (autograd saves no inference tensor; ops._row_norm_setup)
    Tensor source = res.defined() ? out.r : x;
    if (source.is_inference()) source = source.clone();
    ctx->save_for_backward({source, w, out.rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["cast"] = cast;
    if (!res.defined()) return {out.y};
    return {out.y, out.r};
  }

  // ops._row_norm_gradients, in Python: the kernel, or the reference's torch ops where the
  // backward must be differentiable (its _differentiable_backward decides, as needs_math
  // does for the other nodes)
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &source = saved[0], &w = saved[1], &rstd = saved[2];
    // (needs_input_grad counts the tensor inputs present: x, the residual, the weight)
    const bool has_residual = grads.size() > 1;
    const bool needs_x = ctx->needs_input_grad(0), needs_res = has_residual && ctx->needs_input_grad(1);
    const bool needs_w = w.defined() && ctx->needs_input_grad(has_residual ? 2 : 1);
    const std::vector<bool> wanted = {needs_x || needs_res, needs_w, false};
    variable_list g = call_math(row_norm_backward_math, grads[0], has_residual ? grads[1] : Tensor(), source, w,
                                Tensor(), Tensor(), rstd, ctx->saved_data["eps"].toDouble(),
                                ctx->saved_data["offset"].toDouble(), true, ctx->saved_data["cast"].toInt(),
                                "numba", wanted);
    return {needs_x ? g[0] : Tensor(), needs_res ? g[0] : Tensor(), g[1], Tensor(), Tensor(), Tensor()};
  }
};

// LayerNorm's rows go across threads from this many elements (the others' from
// serial_below): torch's kernel splits its rows from 2 on, and ours on one thread, 1.1x-1.6x
// faster than torch's on one, fell behind its two there from ~16K elements (0.8x-0.9x at
// 16K-32K; across threads from 16K: 1.0x-1.6x from 16K to 2M elements, every dtype; 2-core
// Intel Xeon)
constexpr int64_t layer_norm_threads_from = 1 << 14;
constexpr int64_t kept_stats = 1 << 16;  // rows whose statistics' room is kept between calls

// Per thread and dtype code, what LayerNorm's kernel is given in place of what a call
// lacks: ones for an absent weight and -0.0 for an absent bias (h * 1 and h + -0.0 are h,
// bit for bit and sign of zero: one compiled kernel serves every affine combination,
// kernels/cpu.py's ``layer_norm_forward_c``), and room for the float32/float64
// statistics it stores where no call here reads them (the means of a call that records
// nothing) or reads them rounded (a float16/bfloat16 call's, ``rounded_into``).  Grown to
// the largest call seen (the statistics to kept_stats rows; more get their own).
struct LayerNormStandIns {
  Tensor ones, negative_zeros, means, rstds;
};
thread_local LayerNormStandIns stand_ins[4];

const Tensor& stand_in(Tensor& kept, int64_t n, at::ScalarType t, double value) {
  if (!kept.defined() || kept.numel() < n) kept = at::full({std::max<int64_t>(n, 1024)}, value, at::dtype(t));
  return kept;
}

// Room for n statistics of dtype t: the kept room, or their own past kept_stats rows
Tensor stats_room(Tensor& kept, int64_t n, at::ScalarType t) {
  return n <= kept_stats ? stand_in(kept, n, t, 0.0) : torch::empty({n}, at::dtype(t));
}

// The float32 statistics in room, rounded to out's float16/bfloat16 (to nearest even,
// as torch's forward stores them)
template <typename T>
void rounded_into(const Tensor& room, Tensor& out) {
  const float* from = room.data_ptr<float>();
  T* to = out.data_ptr<T>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) to[i] = T(from[i]);
}

// LayerNorm's forward: y, and the residual sum into *r where there is a residual; where
// *mean and *rstd are given (a call that records its graph), the statistics, as torch's
// forward stores them: x's dtype, x's dims with the last 1 (float16/bfloat16 ones
// rounded from the kernel's float32)
Tensor layer_norm_run(const Tensor& x, const Tensor& res, const Tensor& w, const Tensor& b, double eps, Tensor* r,
                      Tensor* mean = nullptr, Tensor* rstd = nullptr) {
  const at::ScalarType t = x.scalar_type(), acc = acc_type(t);
  const int code = dtype_code(t);
  const int64_t d = x.size(-1), n = x.numel() / d;
  LayerNormStandIns& kept = stand_ins[code];
  const Tensor& weight = w.defined() ? w : stand_in(kept.ones, d, t, 1.0);
  const Tensor& bias = b.defined() ? b : stand_in(kept.negative_zeros, d, t, -0.0);
  Tensor means, rstds;  // what the kernel writes
  if (mean != nullptr) {
    std::vector<int64_t> stat_sizes = x.sizes().vec();
    stat_sizes.back() = 1;
    *mean = torch::empty(stat_sizes, x.options());
    *rstd = torch::empty(stat_sizes, x.options());
    const bool rounded = acc != t;
    means = rounded ? stats_room(kept.means, n, acc) : *mean;
    rstds = rounded ? stats_room(kept.rstds, n, acc) : *rstd;
  } else {
    means = stats_room(kept.means, n, acc);
  }
  Tensor y = torch::empty_like(x);
  if (res.defined()) *r = torch::empty_like(x);
  const int64_t w_at = address(weight), b_at = address(bias);
  over_rows(n, d, [&](int64_t lo, int64_t hi) {
    kernels.layer_norm_forward(code, hi - lo, d, row_address(x, lo, d), row_address(res, lo, d), w_at, b_at,
                               row_address(y, lo, d), res.defined() ? row_address(*r, lo, d) : 0,
                               row_address(means, lo, 1), row_address(rstds, lo, 1), eps, 0.0, 0);
  }, layer_norm_threads_from);
  if (mean != nullptr && acc != t) {
    if (t == at::kBFloat16) {
      rounded_into<c10::BFloat16>(means, *mean);
      rounded_into<c10::BFloat16>(rstds, *rstd);
    } else {
      rounded_into<c10::Half>(means, *mean);
      rounded_into<c10::Half>(rstds, *rstd);
    }
  }
  return y;
}

// LayerNorm's node where functional's rule runs our forward kernel and autograd records
// the graph: torch's own backward kernel (at::native_layer_norm_backward, what torch's
// NativeLayerNormBackward0 calls), given the statistics our forward stored, in a node
// written as torch's generated ones are.  That backward is a torch op: it records its
// own double backward (create_graph=True), is batched under vmap and seen by dispatch
// modes, as torch's LayerNorm's is.  Inputs x, the residual where there is one, w, b;
// outputs y, and r = x + residual where there is a residual (its gradient flows to both).
struct LayerNormBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable source, w, b, mean, rstd;  // source: x, or r (an output)
  bool has_residual = false;

  std::string name() const override { return "LayerNormBackward"; }

  void release_variables() override {
    source.reset_data();
    w.reset_data();
    b.reset_data();
    mean.reset_data();
    rstd.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const int64_t k = has_residual ? 1 : 0;  // the parameters' input index past the residual
    const bool needs_w = should_compute_output(1 + k), needs_b = should_compute_output(2 + k);
    const bool needs_x = should_compute_output(0) || (has_residual && should_compute_output(1));
    Tensor dx, dw, db;
    if (grads[0].defined() && (needs_x || needs_w || needs_b)) {
      // (r, an output of this node, is unpacked with it)
      const Tensor x =
          source.unpack(has_residual ? c10::intrusive_ptr<Node>::unsafe_reclaim_from_nonowning(this) : nullptr);
      // Where autograd records this backward (create_graph=True), a bias without a weight
      // is given ones for the weight: torch's double backward of the call without one drops
      // the bias gradient's part (torch 2.13: gradgradcheck fails on
      // torch.nn.functional.layer_norm(x, shape, None, b)); with ones it is right.
      Tensor weight = w.unpack();
      if (!weight.defined() && needs_b && c10::GradMode::is_enabled()) weight = at::ones({x.size(-1)}, x.options());
      std::tie(dx, dw, db) = at::native_layer_norm_backward(grads[0], x, {x.size(-1)}, mean.unpack(), rstd.unpack(),
                                                            weight, b.unpack(), {needs_x, needs_w, needs_b});
    }
    if (has_residual && grads[1].defined()) dx = dx.defined() ? at::add(dx, grads[1]) : grads[1];
    variable_list out{should_compute_output(0) ? dx : Tensor()};
    if (has_residual) out.push_back(should_compute_output(1) ? dx : Tensor());
    out.push_back(dw);
    out.push_back(db);
    return out;
  }
};

// LayerNorm (add+LayerNorm with a residual) recording its node: y, and r where there is a
// residual
Tensor layer_norm_recorded(const Tensor& x, const Tensor& res, const Tensor& w, const Tensor& b, double eps,
                           Tensor* r) {
  auto node = c10::make_intrusive<LayerNormBackward>();
  node->has_residual = res.defined();
  node->set_next_edges(res.defined() ? torch::autograd::collect_next_edges(x, res, w, b)
                                     : torch::autograd::collect_next_edges(x, w, b));
  Tensor mean, rstd;
  Tensor y = layer_norm_run(x, res, w, b, eps, r, &mean, &rstd);
  torch::autograd::set_history(y, node);
  if (res.defined()) {
    torch::autograd::set_history(*r, node);
    node->source = torch::autograd::SavedVariable(*r, true);
  } else {
    // an input made under torch.inference_mode, normalized with a trainable weight, copied
    // (autograd saves no inference tensor; ops._row_norm_setup)
    node->source = torch::autograd::SavedVariable(x.is_inference() ? x.clone() : x, false);
  }
  node->w = torch::autograd::SavedVariable(w, false);
  node->b = torch::autograd::SavedVariable(b, false);
  node->mean = torch::autograd::SavedVariable(mean, false);
  node->rstd = torch::autograd::SavedVariable(rstd, false);
  return y;
}

// Whether normalized_shape names x's last dim (d values) alone, as functional's callers
// give it: an int, or a tuple (a torch.Size) or list of one int
bool last_dim_only(py::handle shape, int64_t d) {
  PyObject* s = shape.ptr();
  if (PyTuple_Check(s) && PyTuple_GET_SIZE(s) == 1) s = PyTuple_GET_ITEM(s, 0);
  else if (PyList_Check(s) && PyList_GET_SIZE(s) == 1) s = PyList_GET_ITEM(s, 0);
  int overflow = 0;
  return PyLong_CheckExact(s) && PyLong_AsLongLongAndOverflow(s, &overflow) == d && !overflow;
}

// p as a tensor, where it is one or None (an undefined tensor); false: something else
bool optional_tensor(py::handle p, Tensor& out) {
  if (p.is_none()) return true;
  if (!THPVariable_Check(p.ptr())) return false;
  out = THPVariable_Unpack(p.ptr());
  return true;
}

// functional's rule's LayerNorm (add+LayerNorm with a residual) on our kernel below the
// rule's bounds, for a call functional has found plain eager on addnorm's choice of
// backend, with its arguments as the caller gave them (a tensor x; a tensor residual or
// None): (y, r or None), with our node (torch's backward kernel) where autograd records
// the graph; None where this path does not serve the call (as row_norm, and arguments of
// another type: an eps that is no float, a normalized_shape of other dims than x's last).
// The arguments are read here, not by pybind11: its conversions, and functional's checks
// of them, cost a small call ~1 µs more.
py::object layer_norm(const Tensor& x, const c10::optional<Tensor>& residual, py::handle normalized_shape,
                      py::handle weight, py::handle bias, py::handle eps) {
  const Tensor res = residual.value_or(Tensor());
  Tensor w, b;
  if (kernels.layer_norm_forward == nullptr || !PyFloat_CheckExact(eps.ptr()) || !optional_tensor(weight, w) ||
      !optional_tensor(bias, b) || !rows_served(x, res, w, b, true) || !last_dim_only(normalized_shape, x.size(-1)) ||
      transformed())
    return py::none();
  const double e = PyFloat_AS_DOUBLE(eps.ptr());
  Tensor r;
  Tensor y = recording({x, res, w, b}) ? layer_norm_recorded(x, res, w, b, e, &r) : layer_norm_run(x, res, w, b, e, &r);
  return py::make_tuple(y, as_py(r));
}

// ops.row_norm's eager contract, (y, r or None, None, None); None where this path does
// not serve the call (see the top of the file): an RMSNorm with a bias, or a LayerNorm
// whose graph is recorded (where this is reached, a backend is forced, and the Python
// path's autograd.Function serves it with our backward kernel; functional's rule calls
// ``layer_norm`` above instead)
py::object row_norm(const Tensor& x, const c10::optional<Tensor>& residual, const c10::optional<Tensor>& weight,
                    const c10::optional<Tensor>& bias, double eps, double offset, bool rms, int64_t cast) {
  const Tensor res = residual.value_or(Tensor()), w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  if ((rms ? kernels.rms_norm_forward == nullptr : kernels.layer_norm_forward == nullptr) || (rms && b.defined()) ||
      !rows_served(x, res, w, b, !rms) || transformed())
    return py::none();
  if (!rms) {
    if (recording({x, res, w, b})) return py::none();
    Tensor r;
    Tensor y = layer_norm_run(x, res, w, b, eps, &r);
    return py::make_tuple(y, as_py(r), py::none(), py::none());
  }
  if (recording({x, res, w})) {
    variable_list out = RmsNorm::apply(x, residual, weight, eps, offset, cast);
    return py::make_tuple(out[0], out.size() > 1 ? py::cast(out[1]) : py::none(), py::none(), py::none());
  }
  RmsOutputs out = rms_norm_run(x, res, w, eps, offset, cast, false);
  return py::make_tuple(out.y, as_py(out.r), py::none(), py::none());
}

// ---------------------------------------------------------------------------
// GroupNorm of a channels-last input x (N, C, *spatial): statistics per (sample, group of
// C / groups channels), then y = (x - mean) * rstd * w + b per channel; w and b (C,) or
// absent.  Only channels-last: there functional's rule runs our kernel (a contiguous
// GroupNorm runs torch's); samples across torch's threads, one sample a thread's work.
// ---------------------------------------------------------------------------

struct GroupNormOutputs {
  Tensor y, mean, var;
};

GroupNormOutputs group_norm_run(const Tensor& x, const Tensor& w, const Tensor& b, int64_t groups, double eps) {
  const int64_t n = x.size(0), c = x.size(1), sample = x.numel() / n, length = sample / c;
  const auto stats = x.options().dtype(acc_type(x.scalar_type()));
  GroupNormOutputs out{torch::empty_like(x), torch::empty({n, groups}, stats), torch::empty({n, groups}, stats)};
  const int64_t code = dtype_code(x.scalar_type());
  over_rows(n, sample, [&](int64_t lo, int64_t hi) {
    kernels.group_norm_cl_forward(code, hi - lo, c, length, groups, row_address(x, lo, sample), address(w),
                                  address(b), row_address(out.y, lo, sample), row_address(out.mean, lo, groups),
                                  row_address(out.var, lo, groups), eps);
  });
  return out;
}

// GroupNorm's node, written as torch's generated ones are (a Node with its saved
// variables), not as a custom autograd::Function: recording the graph costs ~10 µs a call
// where the Function's took ~24, the kernel having evicted autograd's code and data from
// the caches (float16 2x640x32x32; 1.2 µs against 2.5 at 2x64x4x4, in cache)
struct GroupNormBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, w, b, mean, var;
  int64_t groups = 0;
  double eps = 0;

  std::string name() const override { return "GroupNormBackward"; }

  void release_variables() override {
    x.reset_data();
    w.reset_data();
    b.reset_data();
    mean.reset_data();
    var.reset_data();
  }

  // ops._group_norm_grads, in Python: numba's kernel across its threads, or the
  // reference's torch ops where the backward must be differentiable
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    // (none is an output of this node: unpacked without it)
    variable_list g = call_math(group_norm_backward_math, grads[0], x.unpack(), w.unpack(), b.unpack(), mean.unpack(),
                                var.unpack(), groups, eps, "numba");
    // (an absent weight or bias is an invalid edge, never computed)
    return {should_compute_output(0) ? g[0] : Tensor(), should_compute_output(1) ? g[1] : Tensor(),
            should_compute_output(2) ? g[2] : Tensor()};
  }
};

Tensor group_norm_recorded(const Tensor& x, const Tensor& w, const Tensor& b, int64_t groups, double eps) {
  auto node = c10::make_intrusive<GroupNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
  GroupNormOutputs out = group_norm_run(x, w, b, groups, eps);
  node->x = torch::autograd::SavedVariable(x, false);
  node->w = torch::autograd::SavedVariable(w, false);
  node->b = torch::autograd::SavedVariable(b, false);
  node->mean = torch::autograd::SavedVariable(out.mean, false);
  node->var = torch::autograd::SavedVariable(out.var, false);
  node->groups = groups;
  node->eps = eps;
  torch::autograd::set_history(out.y, node);
  return out.y;
}

// Whether x is channels-last (4D) or channels-last-3d (5D), and not contiguous as well
// (one channel, or one position: reference.memory_format's call, the contiguous kernel's)
bool channels_last(const Tensor& x) {
  if (x.is_contiguous()) return false;
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

// (y, None, None), ops.group_norm_y's eager contract; None where this path does not serve
// the call: another layout, dtype or device, parameters of another dtype than x, fewer
// samples than threads in work worth threads (the Python path splits each sample's rows
// there), or python_from bytes and more
py::object group_norm(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                      int64_t groups, double eps) {
  const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  const at::ScalarType t = x.scalar_type();
  if (kernels.group_norm_cl_forward == nullptr || dtype_code(t) < 0 || !plain(x, t) || !channels_last(x) ||
      x.numel() == 0 || groups <= 0 || x.size(1) % groups != 0 || !optional_vector(w, t, x.size(1)) ||
      !optional_vector(b, t, x.size(1)) || !rows_sized(x) ||
      (x.numel() >= kernels.serial_below && x.size(0) < at::get_num_threads()))
    return py::none();
  Tensor y = recording({x, w, b}) ? group_norm_recorded(x, w, b, groups, eps) : group_norm_run(x, w, b, groups, eps).y;
  return py::make_tuple(y, py::none(), py::none());
}

void register_kernels(const py::dict& addresses, int64_t serial_below, int64_t python_from, int64_t forked,
                      int64_t row_block, int64_t float_lanes, int64_t double_lanes) {
  auto get = [&](const char* name) { return reinterpret_cast<void*>(addresses[name].cast<int64_t>()); };
  kernels.dyt_forward = reinterpret_cast<DytForward>(get("dyt_forward"));
  kernels.dyt_backward = reinterpret_cast<DytBackward>(get("dyt_backward"));
  kernels.scale_norm_forward = reinterpret_cast<ScaleNormForward>(get("scale_norm_forward"));
  kernels.scale_norm_backward = reinterpret_cast<ScaleNormBackward>(get("scale_norm_backward"));
  kernels.rms_norm_forward = reinterpret_cast<RmsNormForward>(get("rms_norm_forward"));
  kernels.layer_norm_forward = reinterpret_cast<LayerNormForward>(get("layer_norm_forward"));
  kernels.group_norm_cl_forward = reinterpret_cast<GroupNormForward>(get("group_norm_cl_forward"));
  kernels.float_lanes = float_lanes;
  kernels.double_lanes = double_lanes;
  kernels.serial_below = serial_below;
  kernels.python_from = python_from;
  kernels.forked = reinterpret_cast<const int64_t*>(forked);
  if (addresses.contains("GOMP_parallel")) {
    kernels.omp_parallel = reinterpret_cast<decltype(kernels.omp_parallel)>(get("GOMP_parallel"));
    kernels.omp_thread_num = reinterpret_cast<int (*)()>(get("omp_get_thread_num"));
    kernels.omp_num_threads = reinterpret_cast<int (*)()>(get("omp_get_num_threads"));
  }
  kernels.row_block = row_block;
}

void register_math(const py::object& dyt_math, const py::object& scale_norm_math, const py::object& row_norm_math,
                   const py::object& dyt_threaded, const py::object& group_norm_math) {
  if (dyt_backward_math != nullptr) return;  // once: each op's first call registers them
  // leaked on purpose: a backward may run while the interpreter shuts down
  dyt_backward_math = new py::object(dyt_math);
  dyt_backward_threaded = new py::object(dyt_threaded);
  scale_norm_backward_math = new py::object(scale_norm_math);
  row_norm_backward_math = new py::object(row_norm_math);
  group_norm_backward_math = new py::object(group_norm_math);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "addnorm's eager CPU path of small DyT, ScaleNorm and RMSNorm calls (addnorm/csrc/eager.cpp)";
  m.def("dyt", &dyt, "DyT's eager forward, recording its C++ autograd node where a gradient is wanted; None: not served");
  m.def("scale_norm", &scale_norm, "ScaleNorm's eager forward, as dyt's; (y, None) or None");
  m.def("row_norm", &row_norm, "RMSNorm's and LayerNorm's eager forward (with or without the residual add), as "
        "dyt's; (y, r or None, None, None) or None");
  m.def("layer_norm", &layer_norm, "LayerNorm's (and add+LayerNorm's) eager forward on functional's rule, our "
        "kernel with torch's backward kernel where autograd records; (y, r or None) or None");
  m.def("group_norm", &group_norm, "GroupNorm's eager forward of a channels-last input, as dyt's; "
        "(y, None, None) or None");
  m.def("register_kernels", &register_kernels);
  m.def("register_math", &register_math);
}
