// The eager CPU path of a small DyT or ScaleNorm call, in C++: the autograd node and the
// kernel call without Python between them.
//
// In Python a small call pays for its layers: an autograd.Function's C apply alone costs
// ~3 µs, and the whole forward of a DyT over 64 values recording its graph ~12 µs, where
// torch's four ops (w * tanh(a * x) + b) take ~8.  Here the same numba kernels (the C
// entry points at the end of kernels/cpu.py, compiled by numba as C functions and handed
// over by address) run behind torch's C++ autograd::Function: this file's call of that
// DyT takes ~1.6 µs under no_grad and ~3.8 recording its graph, the whole functional call
// ~4.5 and ~6.5 (torch's ops ~5.7 and ~7.6; 2-core AMD EPYC).  Python keeps the rest:
// the argument checks before the call (functional), the differentiable backward
// (create_graph=True, a batched or wrapped gradient, a dispatch mode: the reference's
// torch ops, called back), and every call this file turns down, for which it returns
// None: another device, dtype or layout, parameters of another dtype than x, work that
// is worth threads (serial_below elements and more).

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <cstdint>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// kernels/cpu.py's C entry points (``C_SIGNATURES``), set by ``register_kernels``
using DytForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
using DytBackward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t);
using ScaleNormForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double);
using ScaleNormBackward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, double);

struct Kernels {
  DytForward dyt_forward = nullptr;
  DytBackward dyt_backward = nullptr;
  ScaleNormForward scale_norm_forward = nullptr;
  ScaleNormBackward scale_norm_backward = nullptr;
  int64_t serial_below = 0;  // elements: kernels/cpu.py's C_SERIAL_BELOW
  int64_t row_block = 32;    // rows per partial sum of DyT's parameter gradients (_ROW_BLOCK)
};
Kernels kernels;

// The reference's differentiable backward of each op, called with the incoming gradient
// and the saved tensors (ops.py's ``_dyt_backward_math``, ``_scale_norm_backward_math``,
// set by ``register_math``); held for the life of the process.
py::object* dyt_backward_math = nullptr;
py::object* scale_norm_backward_math = nullptr;

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

// Whether a backward must be made of torch ops (ops.py's ``_differentiable_backward``,
// and what its ``_traced`` hands to the custom op): autograd records it
// (create_graph=True), a functorch transform runs, a dispatch mode watches (FakeTensorMode,
// FlopCounterMode: no kernel can read a fake tensor, and a mode sees only torch ops), or
// the gradient is no plain tensor (vmap's batched one).
bool needs_math(const Tensor& dy) {
  return torch::GradMode::is_enabled() ||
         c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         c10::impl::TorchDispatchModeTLS::stack_len() > 0 || !plain(dy, dy.scalar_type());
}

py::object as_py(const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }
py::object as_py(double v) { return py::float_(v); }

// math(args...) in Python: a tuple of gradients, None for an absent one
template <typename... Args>
variable_list call_math(const py::object* math, const Args&... args) {
  py::gil_scoped_acquire gil;
  py::tuple out = (*math)(as_py(args)...);
  variable_list grads;
  for (const auto& g : out) grads.push_back(g.is_none() ? Tensor() : g.cast<Tensor>());
  return grads;
}

bool recording(std::initializer_list<Tensor> inputs) {
  if (!torch::GradMode::is_enabled()) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// ---------------------------------------------------------------------------
// DyT: y = w * tanh(alpha * x) + b over rows x (n, d); alpha (1,), w and b (d,) or absent.
// ---------------------------------------------------------------------------

Tensor dyt_run(const Tensor& x, const Tensor& alpha, const Tensor& w, const Tensor& b) {
  Tensor y = torch::empty_like(x);
  kernels.dyt_forward(dtype_code(x.scalar_type()), x.size(0), x.size(1), address(x), address(alpha), address(w),
                      address(b), address(y));
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
    dy = dy.contiguous();  // (autograd gives it the output's dtype)
    const int64_t n = x.size(0), d = x.size(1), blocks = (n + kernels.row_block - 1) / kernels.row_block;
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
  if (kernels.dyt_forward == nullptr || dtype_code(t) < 0 || x.dim() != 2 || x.numel() >= kernels.serial_below ||
      !x.is_contiguous() || !plain(x, t) || !plain(alpha, t) || alpha.numel() != 1 || !optional_plain(w, t) ||
      !optional_plain(b, t))
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
  if (rnorm != nullptr) *rnorm = torch::empty({x.size(0)}, x.options().dtype(acc_type(x.scalar_type())));
  kernels.scale_norm_forward(dtype_code(x.scalar_type()), x.size(0), x.size(1), address(x), address(g), address(y),
                             rnorm != nullptr ? address(*rnorm) : 0, eps);
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
    kernels.scale_norm_backward(dtype_code(x.scalar_type()), n, d, address(dy), address(x), address(g),
                                address(rnorm), address(dx), address(dots), eps);
    return {dx, dots.sum().reshape(g.sizes()).to(g.scalar_type()), Tensor()};
  }
};

// (y, None), ops.scale_norm's eager contract; None where this path does not serve the call
py::object scale_norm(const Tensor& x, const Tensor& g, double eps) {
  const at::ScalarType t = x.scalar_type();
  if (kernels.scale_norm_forward == nullptr || dtype_code(t) < 0 || x.dim() != 2 ||
      x.numel() >= kernels.serial_below || !x.is_contiguous() || !plain(x, t) || !plain(g, t) || g.numel() != 1)
    return py::none();
  Tensor y = recording({x, g}) ? ScaleNorm::apply(x, g, eps) : scale_norm_run(x, g, eps, nullptr);
  return py::make_tuple(y, py::none());
}

void register_kernels(const py::dict& addresses, int64_t serial_below, int64_t row_block) {
  auto get = [&](const char* name) { return reinterpret_cast<void*>(addresses[name].cast<int64_t>()); };
  kernels.dyt_forward = reinterpret_cast<DytForward>(get("dyt_forward"));
  kernels.dyt_backward = reinterpret_cast<DytBackward>(get("dyt_backward"));
  kernels.scale_norm_forward = reinterpret_cast<ScaleNormForward>(get("scale_norm_forward"));
  kernels.scale_norm_backward = reinterpret_cast<ScaleNormBackward>(get("scale_norm_backward"));
  kernels.serial_below = serial_below;
  kernels.row_block = row_block;
}

void register_math(const py::object& dyt_math, const py::object& scale_norm_math) {
  // leaked on purpose: a backward may run while the interpreter shuts down
  dyt_backward_math = new py::object(dyt_math);
  scale_norm_backward_math = new py::object(scale_norm_math);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "addnorm's eager CPU path of small DyT and ScaleNorm calls (addnorm/csrc/eager.cpp)";
  m.def("dyt", &dyt, "DyT's eager forward, recording its C++ autograd node where a gradient is wanted; None: not served");
  m.def("scale_norm", &scale_norm, "ScaleNorm's eager forward, as dyt's; (y, None) or None");
  m.def("register_kernels", &register_kernels);
  m.def("register_math", &register_math);
}
