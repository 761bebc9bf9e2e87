"""The C++ eager path (csrc/eager.cpp): built here, serving small DyT, ScaleNorm and
RMSNorm (and add+RMSNorm) calls, LayerNorm's (and add+LayerNorm's) where autograd records
nothing, and channels-last GroupNorm's, bit for bit what the Python path computes, in
every autograd mode it meets.

The other test files meet the path wherever they call these ops small on the numba
backend (against torch and the float64 reference); this one pins down that it is there,
which calls it takes and turns down, and that both paths agree."""

import contextlib
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import addnorm
import addnorm.functional as AF
from addnorm import ops
from addnorm.kernels import cpp
from conftest import DTYPES, python_path_only
from helpers import SeenOps

pytestmark = pytest.mark.skipif(not addnorm.backends()["numba"], reason="numba is not installed")

COMPILER = shutil.which("c++") is not None and shutil.which("ninja") is not None


def test_built_where_a_compiler_is():
    """`make test` builds it first (`addnorm build`): a failed build fails here, not
    silently slower."""
    if not COMPILER:
        pytest.skip("no C++ compiler or ninja: the Python path serves every call")
    assert cpp.built() is not None, cpp.status()
    assert cpp.module() is not None


needs_cpp = pytest.mark.skipif(cpp.module() is None, reason="the C++ eager path is not built")

# each op of (x, p, w, b): p DyT's alpha or ScaleNorm's g, b doubling as add+RMSNorm's
# residual (of x's shape there); every casting mode, with and without a weight
OPS = {
    "dyt": lambda x, p, w, b: AF.dyt(x, p, w, b),
    "dyt_plain": lambda x, p, w, b: AF.dyt(x, p),
    "dyt_weight": lambda x, p, w, b: AF.dyt(x, p, w),
    "dyt_bias": lambda x, p, w, b: AF.dyt(x, p, None, b),
    "scale_norm": lambda x, p, w, b: AF.scale_norm(x, p),
    "rms_norm": lambda x, p, w, b: AF.rms_norm(x, x.shape[-1:], w, 1e-6),
    "rms_norm_plain": lambda x, p, w, b: AF.rms_norm(x, x.shape[-1:]),
    "rms_norm_llama": lambda x, p, w, b: AF.rms_norm(x, x.shape[-1:], w, casting_mode="llama"),
    "rms_norm_gemma": lambda x, p, w, b: AF.rms_norm(x, x.shape[-1:], w, offset=1.0, casting_mode="gemma"),
    "rms_norm_none": lambda x, p, w, b: AF.rms_norm(x, x.shape[-1:], w, casting_mode="none"),
    "add_rms_norm": lambda x, p, w, b: AF.add_rms_norm(x, b, x.shape[-1:], w, 1e-5),
    "add_rms_norm_plain": lambda x, p, w, b: AF.add_rms_norm(x, b, x.shape[-1:], casting_mode="llama"),
}
RESIDUAL = {"add_rms_norm", "add_rms_norm_plain"}
# GroupNorm of a channels-last input, of (x, w, b) (``_gn_inputs``): 4 groups, with its
# affine parameters, each alone, none
GN_OPS = {
    "group_norm": lambda x, w, b: AF.group_norm(x, 4, w, b),
    "group_norm_weight": lambda x, w, b: AF.group_norm(x, 4, w),
    "group_norm_bias": lambda x, w, b: AF.group_norm(x, 4, None, b),
    "group_norm_plain": lambda x, w, b: AF.group_norm(x, 4),
}
# LayerNorm of (x, p, w, b), served where autograd records nothing: with its weight and
# bias, each alone, none; add+LayerNorm's residual of x's shape (``_inputs``' b there)
LN_OPS = {
    "layer_norm": lambda x, p, w, b: AF.layer_norm(x, x.shape[-1:], w, b),
    "layer_norm_weight": lambda x, p, w, b: AF.layer_norm(x, x.shape[-1:], w),
    "layer_norm_bias": lambda x, p, w, b: AF.layer_norm(x, (x.shape[-1],), None, b),
    "layer_norm_plain": lambda x, p, w, b: AF.layer_norm(x, x.shape[-1]),
    "add_layer_norm": lambda x, p, w, b: AF.add_layer_norm(x, b, x.shape[-1:], w, w.flip(0), 1e-6),
    "add_layer_norm_plain": lambda x, p, w, b: AF.add_layer_norm(x, b, x.shape[-1:]),
}
RESIDUAL |= {"add_layer_norm", "add_layer_norm_plain"}
ALL_OPS = {**OPS, **GN_OPS, **LN_OPS}


def _node(y):
    """The name of the node that made y, past the views of the input's shape; None: none."""
    fn = y.grad_fn
    if fn is None:
        return None
    while type(fn).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        fn = fn.next_functions[0][0]
    return type(fn).__name__


def _inputs(shape, dtype, seed, spread=2.0, residual=False):
    """(x, p, w, b); b of x's shape where it is a residual"""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * spread).to(dtype)
    p = (torch.rand(1, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    w = torch.randn(d, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape if residual else d, generator=g, dtype=torch.float64).to(dtype)
    return x, p, w, b


def _gn_inputs(shape, dtype, seed, spread=2.0):
    """(x, w, b) of a GroupNorm: x of ``shape`` (4 or 5 dims) channels-last, w and b per channel"""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * spread + 0.5).to(dtype)
    w = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d), w, b


def _run(name, inputs, dy_seed=1, wanted=(True, True, True, True)):
    """The op's outputs and the gradients of the ``wanted`` inputs, with the name of the
    node that made its first output; ``name`` an op's in ``ALL_OPS``, or the op itself."""
    leaves = [t.clone().requires_grad_(bool(want)) for t, want in zip(inputs, wanted)]
    out = (ALL_OPS[name] if isinstance(name, str) else name)(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(dy_seed)
    dys = [torch.randn(y.shape, generator=g).to(y.dtype) for y in out]
    if out[0].requires_grad:
        torch.autograd.backward(out, dys)
    return _node(out[0]), [y.detach() for y in out] + [t.grad for t in leaves]


# a row norm's call: leading dims (none, or up to two of 0-9), d values a row, the dtype
# and the inputs' seed (``_inputs``)
ROW_CASES = dict(
    rows=st.lists(st.integers(0, 9), max_size=2),
    d=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)


@needs_cpp
@pytest.mark.xdist_group("row_norm_kernels")  # one xdist worker compiles them (as test_row_norms)
@settings(max_examples=100)
@given(name=st.sampled_from(sorted(OPS)), **ROW_CASES)
def test_same_bits_as_the_python_path(name, rows, d, dtype, seed):
    inputs = _inputs((*rows, d), dtype, seed, residual=name in RESIDUAL)
    # which inputs need a gradient: all, or one (a norm's weight alone, over a frozen trunk)
    wanted = [True] * 4 if seed % 3 else [i == seed % 4 for i in range(4)]
    chosen_node, chosen = _run(name, inputs, wanted=wanted)  # addnorm's choice: functional's own offer
    with addnorm.backend("numba"):
        node, ours = _run(name, inputs, wanted=wanted)
        with python_path_only():
            python_node, theirs = _run(name, inputs, wanted=wanted)
    _same_bits(chosen, ours)
    if node is None:  # no input that the op reads needs a gradient: nothing recorded
        assert python_node is None and chosen_node is None
        return
    assert node == chosen_node == "CppFunction" and python_node != "CppFunction"
    _same_bits(ours, theirs)


@needs_cpp
@pytest.mark.parametrize("name", ["dyt", "scale_norm"])
def test_which_calls_it_serves(name):
    from addnorm.kernels import _torch_threads, cpu

    x, p, w, b = _inputs((4, 64), torch.float32, 0)
    leaf = x.clone().requires_grad_()
    with addnorm.backend("numba"):
        assert _node(OPS[name](leaf, p, w, b)) == "CppFunction"
        # work worth threads: its rows go to torch's threads here (where torch runs on
        # OpenMP), below 32 MB
        big = torch.randn(cpu.C_SERIAL_BELOW // 64, 64, requires_grad=True)
        served = _torch_threads.openmp_runtime() is not None
        assert (_node(OPS[name](big, p, w, b)) == "CppFunction") == served
        huge = torch.empty(cpu._FRESH_MMAP_BYTES // 4 // 64, 64).requires_grad_()
        assert _node(OPS[name](huge, p, w, b)) != "CppFunction"
        # mixed dtypes: turned down
        half = leaf.detach().bfloat16().requires_grad_()  # float32 parameters beside it
        assert _node(OPS[name](half, p, w, b)) != "CppFunction"
    with addnorm.backend("torch"):  # another backend: not ours to serve
        assert _node(OPS[name](leaf, p, w, b)) != "CppFunction"
    with torch.no_grad():
        y = OPS[name](leaf, p, w, b)
    assert y.grad_fn is None and not y.requires_grad


def _in_threads(count, fn):
    """fn() in ``count`` Python threads at once: their results."""
    results = [None] * count

    def work(i):
        results[i] = fn()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


_FORK_CASE: dict = {}  # what a forked child of ``test_rows_across_threads...`` reads


def _in_forked_child():
    """In a child forked after torch's threads ran: the op's forward and backward of the
    parent's tensors (no torch op here that would share out work: GNU OpenMP cannot
    start a team in a forked child, torch's own ops hang there), compared in numpy.
    -> (the node's name, whether y and each input's gradient have the parent's bits)."""
    import numpy as np

    c = _FORK_CASE
    with addnorm.backend("numba"):  # (as the parent's)
        out = ALL_OPS[c["name"]](*c["leaves"])
    y = out[0] if isinstance(out, tuple) else out
    wanted = [t for t in c["leaves"] if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, c["dy"]) if wanted else ()
    def bits(t):  # (numpy has no bfloat16)
        return (t.view(torch.int16) if t.element_size() == 2 else t).detach().numpy()

    same = [np.array_equal(bits(a), bits(b)) for a, b in zip((y, *grads), c["expected"])]
    return _node(y), same


@needs_cpp
@pytest.mark.parametrize("name, wanted", [("scale_norm", (True, True, False, False)), ("dyt", (True,) * 4)])
@pytest.mark.parametrize("shape", [(8, 16384), (3, 30000), (5100, 13), (1, 70000)])
def test_rows_across_threads_give_the_python_paths_bits(name, wanted, shape):
    """DyT and ScaleNorm from ``C_SERIAL_BELOW`` elements on: their rows shared out to
    torch's OpenMP threads by the extension (fewer rows than threads, rows of odd
    lengths), DyT's backward by numba's threaded kernel, called back: the same bits as
    the Python path's threaded kernels.  A child forked after those threads ran, where
    OpenMP cannot start them (a team started there would hang), turns such calls down to
    the Python path, whose kernels run on its one thread there: the same bits again."""
    _across_threads_same_bits(name, _inputs(shape, torch.float32, 11), wanted)


def _across_threads_same_bits(name, inputs, wanted):
    """The op on ``inputs`` (work worth threads) on the C++ path against the Python
    path's bits: here, in three Python threads at once, and in a forked child.  Nothing
    ``wanted``: a call that records no graph (LayerNorm's), which the path serves too."""
    from addnorm.kernels import _torch_threads

    if _torch_threads.openmp_runtime() is None:
        pytest.skip("torch runs on no OpenMP runtime here: the Python path serves these calls")
    shape = inputs[0].shape
    with addnorm.backend("numba"):
        with _served_by_cpp(ops.row_norm) as served:
            node, ours = _run(name, inputs, wanted=wanted)
        with python_path_only():
            python_node, theirs = _run(name, inputs, wanted=wanted)
    if any(wanted):
        assert node == "CppFunction" and python_node != "CppFunction"
    else:
        assert node is python_node is None and served == [True]
    _same_bits(ours, theirs)
    with addnorm.backend("numba"):  # (process-wide: entered here, not in each thread)
        results = _in_threads(3, lambda: _run(name, inputs, wanted=wanted)[1])  # each its own team
    for r in results:
        _same_bits(r, ours)
    # ``_run``'s, in x's layout: the child's backward makes no copy (torch's parallel copy
    # would hang there)
    dy = torch.empty_like(inputs[0]).copy_(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    leaves = [t.clone().requires_grad_(want) for t, want in zip(inputs, wanted)]
    _FORK_CASE.update(name=name, leaves=leaves, dy=dy, expected=[ours[0], *(g for g in ours[1:] if g is not None)])
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child_node, same = pool.apply_async(_in_forked_child).get(120)
    finally:
        _FORK_CASE.clear()
    assert child_node != "CppFunction" and same == [True] * (1 + sum(wanted))  # the Python path's, on one thread


@contextlib.contextmanager
def _offered_by_functional(entry):
    """The calls functional offered the C++ path itself in the block (``_Entry.eager_cpp``,
    past ``_forward`` and the op's entry), each whether it was ``entry``'s: a list."""
    offered, eager_cpp = [], ops._Entry.eager_cpp

    def seen(e, *args):
        offered.append(e is entry)
        return eager_cpp(e, *args)

    ops._Entry.eager_cpp = seen
    try:
        yield offered
    finally:
        ops._Entry.eager_cpp = eager_cpp


@contextlib.contextmanager
def _served_by_cpp(*entries):
    """Whether the C++ eager path served each call offered it of ``entries`` (ops of
    ``ops``, or its functions no op fronts: ``ops.layer_norm_cpp``) in the block: a list
    of bools, in the calls' order."""
    served, saved = [], []
    for entry in entries:
        path = isinstance(entry, ops._CppPath)
        attr = "function" if path else "cpp"
        real = ops._cpp_function(entry.name if path else entry.cpp_name)

        def spy(*args, real=real):
            out = real(*args)
            served.append(out is not None)
            return out

        saved.append((entry, attr, getattr(entry, attr)))
        setattr(entry, attr, spy)
    try:
        yield served
    finally:
        for entry, attr, was in saved:
            setattr(entry, attr, was)


def _same_bits(ours, theirs):
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            a, b = a.reshape(-1), b.reshape(-1)  # (a channels-last output: its values in one order)
            assert torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)


@needs_cpp
@pytest.mark.parametrize("name", ["dyt", "rms_norm", "add_rms_norm", "group_norm", "group_norm_bias"])
@pytest.mark.parametrize("wanted", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 0, 1, 0), (0, 0, 1, 1)])
def test_the_gradients_asked_for(name, wanted):
    """Each input's gradient alone and in pairs (a norm's weight over a frozen trunk, a
    residual stream alone, a GroupNorm's bias beside its weight and alone), as the Python
    path gives them: the node maps autograd's inputs, of which an absent one is none, to
    the kernel's outputs."""
    if name in GN_OPS:  # (x, w, b): wanted's first three
        inputs = _gn_inputs((2, 8, 3, 5), torch.float32, 3)
    else:
        inputs = _inputs((5, 33), torch.float32, 8, residual=name in RESIDUAL)
    with addnorm.backend("numba"):
        node, ours = _run(name, inputs, wanted=wanted)
        with python_path_only():
            _, theirs = _run(name, inputs, wanted=wanted)
    assert node in ("CppFunction", None)
    _same_bits(ours, theirs)


@needs_cpp
def test_which_rms_norm_calls_it_serves():
    from addnorm.kernels import cpu

    x, _, w, res = _inputs((4, 64), torch.float32, 0, residual=True)
    leaf = x.clone().requires_grad_()
    with addnorm.backend("numba"):
        assert _node(AF.rms_norm(leaf, (64,), w)) == "CppFunction"
        # a decoding step as a model passes it: (batch, tokens, d), as it is
        step = torch.randn(1, 1, 4096, requires_grad=True)
        assert _node(AF.rms_norm(step, (4096,), torch.ones(4096))) == "CppFunction"
        y, r = AF.add_rms_norm(leaf, res, (64,), w)
        assert _node(y) == "CppFunction" and r.grad_fn is y.grad_fn
        # a normalized shape of two dims: as rows of its 64 values
        assert _node(AF.rms_norm(leaf.reshape(4, 8, 8), (8, 8), w.reshape(8, 8))) == "CppFunction"
        # turned down, to the Python path: work worth threads, a float32 weight beside
        # bfloat16 input, LayerNorm (whose small calls run torch's kernel but here)
        big = torch.randn(cpu.C_SERIAL_BELOW // 64, 64, requires_grad=True)
        assert _node(AF.rms_norm(big, (64,), w)) != "CppFunction"
        half = leaf.detach().bfloat16().requires_grad_()
        assert _node(AF.rms_norm(half, (64,), w)) != "CppFunction"
        assert _node(AF.layer_norm(leaf, (64,), w)) != "CppFunction"
    with addnorm.backend("torch"):
        assert _node(AF.rms_norm(leaf, (64,), w)) != "CppFunction"
    with torch.no_grad():
        y, r = AF.add_rms_norm(leaf, res, (64,), w)
    assert y.grad_fn is None and r.grad_fn is None
    with torch.inference_mode():  # an inference tensor normalized with a trainable weight
        frozen = x.clone()
    wl = w.clone().requires_grad_()
    with addnorm.backend("numba"):
        y = AF.rms_norm(frozen, (64,), wl)
    assert _node(y) == "CppFunction"
    y.sum().backward()
    assert wl.grad is not None and torch.isfinite(wl.grad).all()


@needs_cpp
@pytest.mark.parametrize("name", ["dyt", "scale_norm", "rms_norm", "rms_norm_gemma", "add_rms_norm",
                                  "add_rms_norm_plain"])
def test_gradcheck_and_gradgradcheck_through_it(name):
    """float64, on the C++ node; its double backward is the reference's torch ops, called
    back from C++ (create_graph=True)."""
    x, p, w, b = _inputs((3, 7), torch.float64, 2, residual=name in RESIDUAL)
    leaves = [t.clone().requires_grad_() for t in (x, p, w, b)]
    out = OPS[name](*leaves)
    assert _node(out[0] if isinstance(out, tuple) else out) == "CppFunction"
    fn = OPS[name]
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@needs_cpp
@pytest.mark.parametrize("name", ["dyt", "rms_norm"])
def test_batched_gradient_and_transforms(name):
    """vmap over autograd.grad of a graph recorded on the C++ node (a batched incoming
    gradient: the reference's ops), and torch.func over the op (the reference's ops, as
    on the Python path) equal the plain loop."""
    x, p, w, b = _inputs((2, 5), torch.float32, 3)
    xl = x.clone().requires_grad_()
    y = OPS[name](xl, p, w, b)
    assert _node(y) == "CppFunction"
    basis = torch.eye(y.numel()).reshape(-1, *y.shape)
    (jac,) = torch.autograd.grad(y, xl, basis, is_grads_batched=True, retain_graph=True)
    rows = [torch.autograd.grad(y, xl, e, retain_graph=True)[0] for e in basis]
    torch.testing.assert_close(jac, torch.stack(rows))
    grad = torch.func.grad(lambda t: OPS[name](t, p, w, b).sum())(x)
    torch.testing.assert_close(grad, torch.stack(rows).sum(0))


@needs_cpp
def test_checkpointing_and_saved_tensor_hooks():
    """Activation checkpointing (both kinds) and saved-tensor hooks (offloading) see the
    C++ nodes' saved tensors as they see any node's, and give the same gradients."""
    from torch.utils.checkpoint import checkpoint

    x, p, w, _ = _inputs((4, 64), torch.float32, 9)
    lin = torch.nn.Linear(64, 64)
    leaves = [x.requires_grad_(), p.requires_grad_(), w.requires_grad_()]

    def block(t):
        return AF.dyt(AF.rms_norm(lin(t), 64, w), p, w) * 2

    def grads(run):
        for t in leaves:
            t.grad = None
        run().sum().backward()
        return [t.grad.clone() for t in leaves]

    assert _node(AF.rms_norm(x, 64, w)) == "CppFunction"
    expected = grads(lambda: block(x))
    for reentrant in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(grads(lambda: checkpoint(block, x, use_reentrant=reentrant)),
                                                     expected))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t.clone(), lambda t: t):
        y = AF.rms_norm(x, 64, w)
    assert packed == [(4, 64), (64,), (4,)]  # x, the weight, rstd
    with torch.autograd.graph.save_on_cpu():
        got = grads(lambda: block(x))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@needs_cpp
def test_inplace_change_of_a_saved_input_is_caught():
    x, p, w, b = _inputs((2, 8), torch.float32, 4)
    xl = x.clone().requires_grad_()
    h = xl * 1.0
    y = AF.dyt(h, p, w, b)
    assert _node(y) == "CppFunction"
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_cpp
def test_backward_twice_needs_retain_graph():
    x, p, w, b = _inputs((2, 8), torch.float32, 5)
    xl = x.clone().requires_grad_()
    y = AF.scale_norm(xl, p)
    y.sum().backward(retain_graph=True)
    first = xl.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(xl.grad, 2 * first)
    y = AF.scale_norm(xl, p)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


@needs_cpp
@pytest.mark.parametrize("name", ["dyt", "add_rms_norm"])
def test_threads_and_forked_children(name):
    """Python threads at once, and a child forked after the path was loaded, compute what
    the parent computes."""
    x, p, w, b = _inputs((16, 64), torch.float32, 6, residual=name in RESIDUAL)
    expected = _run(name, (x, p, w, b))[1]
    for r in _in_threads(4, lambda: _run(name, (x, p, w, b))[1]):
        _same_bits(r, expected)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        node, child = pool.apply(_run, (name, (x, p, w, b)))
    assert node == "CppFunction"
    _same_bits(child, expected)


def test_turned_off_by_the_environment():
    code = ("import torch, addnorm.functional as AF; from addnorm.kernels import cpp;"
            "x = torch.randn(2, 8, requires_grad=True);"
            "print(cpp.status().split()[0], type(AF.dyt(x, torch.ones(1)).grad_fn).__name__)")
    env = dict(os.environ, ADDNORM_EAGER_CPP="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["off", "dyt_fwdBackward"]


@needs_cpp
def test_a_cold_numba_cache_leaves_small_calls_on_the_python_path(tmp_path):
    """Where numba's cache lacks the C entry points (another NUMBA_CACHE_DIR, an edit of
    kernels/cpu.py), the first small call does not compile them all (~1.5 min): it says
    so once and takes the Python path, which compiles only the kernel it runs."""
    code = ("import torch, addnorm.functional as AF;"
            "x = torch.randn(2, 8, requires_grad=True);"
            "print(type(AF.rms_norm(x, 8).grad_fn).__name__, type(AF.dyt(x, torch.ones(1)).grad_fn).__name__)")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["row_norm_fwdBackward", "dyt_fwdBackward"]
    assert out.stderr.count("`addnorm build` compiles them") == 1


@needs_cpp
def test_backward_under_a_dispatch_mode_is_made_of_torch_ops():
    """A dispatch mode watching the backward (FlopCounterMode, a tracer) sees torch ops,
    never a kernel reading memory behind its back: the reference's backward, called back."""
    x, p, w, b = _inputs((3, 16), torch.float32, 7)
    xl = x.clone().requires_grad_()
    y = AF.dyt(xl, p, w, b)
    assert _node(y) == "CppFunction"
    dy = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, xl, dy, retain_graph=True)
    with SeenOps() as mode:
        (got,) = torch.autograd.grad(y, xl, dy)
    assert "aten.tanh.default" in mode.seen
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------
# GroupNorm of a channels-last input: the rule's "group_norm_ours" calls
# ---------------------------------------------------------------------------


@needs_cpp
@settings(max_examples=60, deadline=None)
@given(
    affine=st.sampled_from(sorted(GN_OPS)),
    n=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    per_group=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 6), min_size=2, max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_group_norm_same_bits_as_the_python_path(affine, n, groups, per_group, spatial, dtype, seed):
    """Every dtype, 4 and 5 dims, each affine parameter present or not and each input's
    gradient wanted or not: the C++ node's outputs and gradients are the Python path's
    bits.  A channels-last tensor that is contiguous as well (one channel or one
    position) is the contiguous kernel's: the Python path's."""
    assume(n * per_group * math.prod(spatial) > 1)  # (more than one value per group)
    c = groups * per_group
    inputs = _gn_inputs((n, c, *spatial), dtype, seed)
    wanted = [True] * 3 if seed % 3 else [i == seed % 3 for i in range(3)]
    reads = [True, affine in ("group_norm", "group_norm_weight"), affine in ("group_norm", "group_norm_bias")]

    def op(x, w, b):  # ``affine``'s parameters, ``groups`` groups
        return AF.group_norm(x, groups, w if reads[1] else None, b if reads[2] else None)

    with addnorm.backend("numba"):
        node, ours = _run(op, inputs, wanted=wanted)
        with python_path_only():
            python_node, theirs = _run(op, inputs, wanted=wanted)
    _same_bits(ours, theirs)
    if not any(want and read for want, read in zip(wanted, reads)):
        assert node is None and python_node is None  # nothing recorded
    else:
        assert (node == "CppFunction") == (not inputs[0].is_contiguous()) and python_node != "CppFunction"


@needs_cpp
@pytest.mark.parametrize("shape, dtype", [((4, 64, 32, 32), torch.float32), ((3, 36, 33, 31), torch.float32),
                                          ((2, 320, 16, 16), torch.bfloat16), ((2, 24, 8, 16, 24), torch.float16)])
def test_group_norm_samples_across_threads_give_the_python_paths_bits(shape, dtype):
    """From ``C_SERIAL_BELOW`` elements on, samples shared out to torch's threads (more
    samples than threads, an odd count): the Python path's bits, whose kernel runs a
    sample a thread as well; in Python threads at once, and in a forked child."""
    if shape[0] < torch.get_num_threads():
        pytest.skip("fewer samples than threads: the Python path's split kernel serves these")
    _across_threads_same_bits("group_norm", _gn_inputs(shape, dtype, 5), (True, True, True))


@needs_cpp
def test_which_group_norm_calls_it_serves():
    from addnorm.kernels import cpu

    x, w, b = _gn_inputs((2, 8, 4, 4), torch.float32, 0)
    leaf = x.clone().requires_grad_()
    with addnorm.backend("numba"):
        assert _node(AF.group_norm(leaf, 4, w, b)) == "CppFunction"
        x5, w5, b5 = _gn_inputs((2, 8, 2, 3, 4), torch.bfloat16, 1)
        assert _node(AF.group_norm(x5.requires_grad_(), 2, w5, b5)) == "CppFunction"
        # turned down, to the Python path: a contiguous input, parameters of another
        # dtype (float32 beside bfloat16), 32 MB and more
        assert _node(AF.group_norm(leaf.contiguous(), 4, w, b)) != "CppFunction"
        half = leaf.detach().bfloat16().requires_grad_()
        assert _node(AF.group_norm(half, 4, w, b)) != "CppFunction"
        huge = torch.empty(2, 64, 256, cpu._FRESH_MMAP_BYTES // 4 // (2 * 64 * 256)).to(
            memory_format=torch.channels_last).requires_grad_()
        assert _node(AF.group_norm(huge, 4)) != "CppFunction"
        # work worth threads with fewer samples than threads: the Python path splits each
        # sample's rows there
        one = torch.randn(1, 64, 64, 64).to(memory_format=torch.channels_last).requires_grad_()
        assert (_node(AF.group_norm(one, 4)) == "CppFunction") == (torch.get_num_threads() == 1)
    with addnorm.backend("torch"):
        assert _node(AF.group_norm(leaf, 4, w, b)) != "CppFunction"
    with torch.no_grad():
        with addnorm.backend("numba"):
            y = AF.group_norm(leaf, 4, w, b)
    assert y.grad_fn is None and not y.requires_grad
    assert y.is_contiguous(memory_format=torch.channels_last)


@needs_cpp
@pytest.mark.parametrize("name", sorted(GN_OPS))
def test_group_norm_gradcheck_and_gradgradcheck_through_it(name):
    """float64 on the C++ node, 4 and 5 dims; the double backward is the reference's
    torch ops, called back (create_graph=True)."""
    for shape in ((2, 8, 3, 2), (2, 4, 2, 1, 3)):
        leaves = [t.clone().requires_grad_() for t in _gn_inputs(shape, torch.float64, 2)]
        with addnorm.backend("numba"):
            assert _node(GN_OPS[name](*leaves)) == "CppFunction"
            assert torch.autograd.gradcheck(GN_OPS[name], leaves)
            assert torch.autograd.gradgradcheck(GN_OPS[name], leaves)


def _saves_as_torchs_nodes_do(norm, block, x, leaves, saved):
    """What a C++ node written as torch's generated ones (a Node with saved variables)
    does as they do, for ``norm`` (a function of one input recording such a node) and
    ``block`` (a model around it): saved-tensor hooks see what it saves (``saved``: each
    tensor's (shape, dtype), in order), both kinds of checkpointing and offloading give
    the same gradients of ``leaves``, an in-place change of a saved input is caught, a
    second backward needs retain_graph."""
    from torch.utils.checkpoint import checkpoint

    def grads(run):
        for t in leaves:
            t.grad = None
        run().float().square().sum().backward()
        return [t.grad.clone() for t in leaves]

    expected = grads(lambda: block(x))
    for reentrant in (False, True):
        got = grads(lambda: checkpoint(block, x, use_reentrant=reentrant))
        assert all(torch.equal(a, e) for a, e in zip(got, expected))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append((t.shape, t.dtype)) or t.clone(),
                                                  lambda t: t):
        norm(x)
    assert packed == saved
    with torch.autograd.graph.save_on_cpu():
        assert all(torch.equal(a, e) for a, e in zip(grads(lambda: block(x)), expected))
    h = x * 1.0
    y = norm(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.float().sum().backward()
    y = norm(x)
    y.float().sum().backward(retain_graph=True)
    y.float().sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.float().sum().backward()


@needs_cpp
def test_group_norm_node_saves_as_torchs_nodes_do():
    """GroupNorm's node (a Node with saved variables, as torch's generated ones) does
    as they do (``_saves_as_torchs_nodes_do``), and autograd.grad of the weight alone
    asks the kernel for no more."""
    x, w, b = _gn_inputs((2, 8, 4, 4), torch.float32, 4)
    conv = torch.nn.Conv2d(8, 8, 1).to(memory_format=torch.channels_last)
    leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]

    def norm(t):
        return AF.group_norm(t, 4, w, b)

    with addnorm.backend("numba"):
        y = norm(x)
        assert _node(y) == "CppFunction" and y.grad_fn.name() == "GroupNormBackward"
        f32 = torch.float32
        _saves_as_torchs_nodes_do(norm, lambda t: torch.nn.functional.silu(norm(conv(t))), x, leaves,
                                  [((2, 8, 4, 4), f32), ((8,), f32), ((8,), f32), ((2, 4), f32), ((2, 4), f32)])
        (dw,) = torch.autograd.grad(norm(x).sum(), [w])
        # (torch 2.13's own channels-last backward, asked for the weight's gradient alone,
        # crashes the process: against its contiguous one)
        flat = torch.nn.functional.group_norm(x.contiguous(), 4, w, b)
        torch.testing.assert_close(dw, torch.autograd.grad(flat.sum(), [w])[0])


@needs_cpp
@pytest.mark.native_rule
def test_group_norm_rule_calls_go_there_only_in_plain_eager():
    """addnorm's choice of our kernel (a bfloat16 channels-last call recording its graph,
    2 channels a group: functional's rule) goes straight to the C++ path, past
    functional's layers, in plain eager execution only: a forward-AD dual input gets its
    tangent (the reference's ops), a dispatch mode sees the custom op, torch.func
    differentiates it."""
    import torch.autograd.forward_ad as fwAD

    from addnorm import functional, ops

    x, w, b = _gn_inputs((2, 64, 16, 16), torch.bfloat16, 6)
    leaf = x.clone().requires_grad_()
    assert functional._group_norm_rule(leaf, 32, w, b) == "group_norm_ours"
    with _offered_by_functional(ops.group_norm_y) as served:
        assert _node(AF.group_norm(leaf, 32, w, b)) == "CppFunction" and served == [True]
    # a UNet's shape, one sample a thread where there are as many threads
    unet = torch.randn(2, 64, 64, 64).bfloat16().to(memory_format=torch.channels_last).requires_grad_()
    assert (_node(AF.group_norm(unet, 32, w, b)) == "CppFunction") == (torch.get_num_threads() <= 2)
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        y = AF.group_norm(fwAD.make_dual(x, tangent), 32, w, b)
        jvp = fwAD.unpack_dual(y).tangent
    # (torch 2.13's own forward AD fails on a channels-last input: its contiguous one)
    _, expected = torch.func.jvp(lambda t: torch.nn.functional.group_norm(t, 32, w.double(), b.double()),
                                 (x.double().contiguous(),), (tangent.double().contiguous(),))
    torch.testing.assert_close(jvp.double(), expected, atol=0.1, rtol=0.05)
    with SeenOps() as mode:
        AF.group_norm(leaf, 32, w, b)
    assert "addnorm.group_norm_fwd.default" in mode.seen, mode.seen
    grad = torch.func.grad(lambda t: AF.group_norm(t, 32, w, b).float().square().sum())(x)
    (plain,) = torch.autograd.grad(AF.group_norm(leaf, 32, w, b).float().square().sum(), [leaf])
    torch.testing.assert_close(grad.float(), plain.float(), atol=0.1, rtol=0.05)


@needs_cpp
@pytest.mark.native_rule
@pytest.mark.xdist_group("row_norm_kernels")
@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(sorted(LN_OPS)), **ROW_CASES)
def test_unrecorded_layer_norm_same_bits_as_the_python_path(name, rows, d, dtype, seed):
    """LayerNorm and add+LayerNorm where autograd records nothing, on the C++ path both
    by addnorm's choice (functional's rule: ours where nothing is recorded, at every size)
    and on a forced numba backend: the Python path's bits, each affine combination (the
    path stands ones and -0.0 in for an absent weight and bias: the same bits, the sign of
    a zero included)."""
    inputs = _inputs((*rows, d), dtype, seed, residual=name in RESIDUAL)
    if seed % 2:
        inputs = (inputs[0].round(), *inputs[1:])  # rows with repeated values, zeros among the outputs
    with torch.no_grad():
        with _served_by_cpp(ops.row_norm, ops.layer_norm_cpp) as served:
            chosen = LN_OPS[name](*inputs)
            with addnorm.backend("numba"):
                forced = LN_OPS[name](*inputs)
        with python_path_only(), addnorm.backend("numba"):
            theirs = LN_OPS[name](*inputs)
    assert served == [True, True]
    for ours in (chosen, forced):
        ours, theirs_ = (ours, theirs) if isinstance(ours, tuple) else ((ours,), (theirs,))
        _same_bits(ours, theirs_)
        assert torch.equal(ours[0].signbit(), theirs_[0].signbit())


@needs_cpp
@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm_plain"])
@pytest.mark.parametrize("shape", [(2, 8192), (8, 16384), (3, 30000), (5100, 13), (1, 70000)])
def test_unrecorded_layer_norm_rows_across_threads_give_the_python_paths_bits(name, shape):
    """LayerNorm's rows go to torch's threads from 16K elements (a row alone: one
    thread): the Python path's bits, in Python threads at once, and in a forked child,
    which turns the threads down (its one thread: the same bits)."""
    _across_threads_same_bits(name, _inputs(shape, torch.bfloat16, 5, residual=name in RESIDUAL), (False,) * 4)


@needs_cpp
@pytest.mark.native_rule
def test_which_layer_norm_calls_it_serves():
    """addnorm's choice (small calls: functional's rule): our kernel on the C++ path, with
    a node whose backward is torch's kernel where autograd records the graph; a forced
    numba backend, the Python path's node there (our backward kernel).  What the path
    turns down runs as before: torch's kernel (a weight of another dtype, strided input, a
    normalized shape of two dims), the reference's ops where a transform or a tracer
    watches."""
    import torch.autograd.forward_ad as fwAD

    x, _, w, b = _inputs((6, 64), torch.float32, 3)
    leaf = x.clone().requires_grad_()
    with _served_by_cpp(ops.row_norm, ops.layer_norm_cpp) as served:
        with torch.no_grad():
            y = AF.layer_norm(leaf, (64,), w, b)
        assert y.grad_fn is None and served == [True]
        with torch.inference_mode():
            AF.add_layer_norm(x, x, 64, w, b)
        assert served == [True, True]
        assert AF.layer_norm(leaf, (64,), w, b).grad_fn.name() == "LayerNormBackward"
        y, r = AF.add_layer_norm(leaf, x, [64], w, b)
        assert y.grad_fn is r.grad_fn and y.grad_fn.name() == "LayerNormBackward"
        assert AF.layer_norm(x, 64, w, b).grad_fn is None  # (nothing to record)
        with addnorm.backend("numba"):
            assert _node(AF.layer_norm(leaf, (64,), w, b)) == "row_norm_fwdBackward"
        assert served == [True] * 5 + [False]  # (the forced backend's offer, turned down)
        served.clear()
        with torch.no_grad():
            half = x.bfloat16()
            y = AF.layer_norm(half, (64,), w, b)  # float32 parameters beside bfloat16 input
            torch.testing.assert_close(y, torch.nn.functional.layer_norm(half, (64,), w, b), rtol=0, atol=0)
            strided = x.t().contiguous().t()
            torch.testing.assert_close(AF.layer_norm(strided, (64,), w, b),
                                       torch.nn.functional.layer_norm(strided, (64,), w, b), rtol=0, atol=0)
            squares = x.reshape(6, 8, 8)
            torch.testing.assert_close(AF.layer_norm(squares, (8, 8)),
                                       torch.nn.functional.layer_norm(squares, (8, 8)), rtol=0, atol=0)
        assert served == [False, False, False]
        # transforms and tracers: what the path cannot see, so it turns the call down
        tangent = torch.randn_like(x)
        with torch.no_grad(), fwAD.dual_level():
            jvp = fwAD.unpack_dual(AF.layer_norm(fwAD.make_dual(x, tangent), (64,), w, b)).tangent
        _, expected = torch.func.jvp(lambda t: torch.nn.functional.layer_norm(t, (64,), w, b), (x,), (tangent,))
        torch.testing.assert_close(jvp, expected)
        with torch.no_grad():
            batched = torch.vmap(lambda t: AF.add_layer_norm(t, t, (64,), w, b)[0])(x.reshape(2, 3, 64))
            torch.testing.assert_close(batched, torch.nn.functional.layer_norm(2 * x, (64,), w, b).reshape(2, 3, 64))
            with SeenOps() as mode:
                AF.layer_norm(x, (64,), w, b)
            assert "addnorm.row_norm_fwd.default" in mode.seen, mode.seen
        assert not any(served)
        with torch.no_grad():  # (the trace's own check then runs the function untraced: served)
            traced = torch.jit.trace(lambda t: AF.layer_norm(t, (64,), w, b), x)
            other = torch.randn(6, 64)
            torch.testing.assert_close(traced(other), torch.nn.functional.layer_norm(other, (64,), w, b))


# torch.nn's counterpart of each of LN_OPS
LN_TORCH = {
    "layer_norm": lambda x, p, w, b: F.layer_norm(x, x.shape[-1:], w, b),
    "layer_norm_weight": lambda x, p, w, b: F.layer_norm(x, x.shape[-1:], w),
    "layer_norm_bias": lambda x, p, w, b: F.layer_norm(x, x.shape[-1:], None, b),
    "layer_norm_plain": lambda x, p, w, b: F.layer_norm(x, x.shape[-1:]),
    "add_layer_norm": lambda x, p, w, b: (F.layer_norm(x + b, x.shape[-1:], w, w.flip(0), 1e-6), x + b),
    "add_layer_norm_plain": lambda x, p, w, b: (F.layer_norm(x + b, x.shape[-1:]), x + b),
}


@needs_cpp
@pytest.mark.native_rule
@pytest.mark.xdist_group("row_norm_kernels")
@settings(max_examples=40, deadline=None)  # (three runs each: ours, torch.nn's, the Python path's)
@given(name=st.sampled_from(sorted(LN_OPS)), **ROW_CASES)
def test_recorded_layer_norm_runs_our_forward_and_torchs_backward(name, rows, d, dtype, seed):
    """LayerNorm and add+LayerNorm recording their graph, by addnorm's choice below the
    rule's bounds (the C++ path's node): the forward has the Python path's bits (our
    kernel), the gradients are torch.nn's (torch's backward kernel, given our statistics,
    whose last bit may differ from torch's: within a few units of the last place of the
    largest), for each affine combination and whichever inputs want a gradient."""
    inputs = _inputs((*rows, d), dtype, seed, residual=name in RESIDUAL)
    wanted = (seed % 4 != 0, False, seed % 3 != 0, seed % 4 != 1)  # x, (p), w, b or the residual
    assume(inputs[0].numel() and any(wanted))
    with _served_by_cpp(ops.layer_norm_cpp) as served:
        node, ours = _run(name, inputs, wanted=wanted)
    assert served == [True]
    _, theirs = _run(LN_TORCH[name], inputs, wanted=wanted)
    with python_path_only(), addnorm.backend("numba"):
        _, python = _run(name, inputs, wanted=wanted)
    outputs = 2 if name in RESIDUAL else 1
    _same_bits(ours[:outputs], python[:outputs])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    for got, expected in zip(ours[outputs:], theirs[outputs:]):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))


@needs_cpp
@pytest.mark.native_rule
@pytest.mark.parametrize("name", sorted(LN_OPS))
def test_recorded_layer_norm_gradcheck_and_gradgradcheck(name):
    """float64 on the rule's node, whose backward is torch's kernel, a torch op: autograd
    records its double backward (create_graph=True)."""
    x, p, w, b = _inputs((3, 7), torch.float64, 2, residual=name in RESIDUAL)
    leaves = [t.clone().requires_grad_(i != 1) for i, t in enumerate((x, p, w, b))]
    out = LN_OPS[name](*leaves)
    assert (out[0] if isinstance(out, tuple) else out).grad_fn.name() == "LayerNormBackward"
    assert torch.autograd.gradcheck(LN_OPS[name], leaves)
    assert torch.autograd.gradgradcheck(LN_OPS[name], leaves)


@needs_cpp
@pytest.mark.native_rule
def test_recorded_layer_norm_node_behaves_as_torchs():
    """The rule's LayerNorm node, a Node with saved variables as torch's generated ones,
    does as they do (``_saves_as_torchs_nodes_do``; what it saves is torch's: the input,
    the parameters, the statistics of its shape and dtype); a batched gradient (vmap
    over the backward) and a dispatch mode watching it see torch's backward op, an input
    made under inference_mode is normalized with a trainable weight, and the residual
    sum's own gradient flows to both addends."""
    x, _, w, b = _inputs((4, 64), torch.bfloat16, 11)
    lin = torch.nn.Linear(64, 64, dtype=torch.bfloat16)
    leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]

    def norm(t):
        return AF.layer_norm(t, 64, w, b)

    assert norm(x).grad_fn.name() == "LayerNormBackward"
    _, mean, rstd = torch.native_layer_norm(x.detach(), (64,), w.detach(), b.detach(), 1e-5)
    _saves_as_torchs_nodes_do(norm, lambda t: norm(lin(t)), x, leaves,
                              [(t.shape, t.dtype) for t in (x, w, b, mean, rstd)])
    # a batched incoming gradient, and a dispatch mode: torch's backward op sees both
    xf = torch.randn(2, 5, requires_grad=True)
    y = AF.layer_norm(xf, 5)
    basis = torch.eye(y.numel()).reshape(-1, *y.shape)
    (jac,) = torch.autograd.grad(y, xf, basis, is_grads_batched=True, retain_graph=True)
    rows = [torch.autograd.grad(y, xf, e, retain_graph=True)[0] for e in basis]
    torch.testing.assert_close(jac, torch.stack(rows))
    with SeenOps() as mode:
        torch.autograd.grad(y, xf, basis[3])
    assert "aten.native_layer_norm_backward.default" in mode.seen, mode.seen
    with torch.inference_mode():
        made = torch.randn(3, 64)
    y = AF.layer_norm(made, 64, w.detach().float().requires_grad_())
    assert y.grad_fn.name() == "LayerNormBackward"
    y.sum().backward()
    a, r0 = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    y, r = AF.add_layer_norm(a, r0, 8)
    (y.sum() * 0 + r.square().sum()).backward()
    torch.testing.assert_close(a.grad, 2 * (a + r0).detach())
    torch.testing.assert_close(r0.grad, a.grad)
    a.grad = r0.grad = None
    r.sum().backward()  # (only the residual sum's gradient: y's is none)
    torch.testing.assert_close(a.grad, torch.ones_like(a))


def _recorded_layer_norm(x, w, b):
    """A LayerNorm recording its graph on the rule's node: its node's name, y, and the
    gradients of x, w and b from a fixed cotangent."""
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = AF.layer_norm(leaves[0], x.shape[-1], leaves[1], leaves[2])
    dy = torch.empty_like(y).copy_(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return (y.grad_fn.name(), y.detach(), *torch.autograd.grad(y, leaves, dy))


def _recorded_forward_in_forked_child():
    """``_recorded_layer_norm``'s forward of ``_FORK_CASE``'s inputs in a forked child (no
    torch op that would share out work: ``_in_forked_child``): its node's name, and
    whether y has the parent's bits."""
    import numpy as np

    x, w, b = (t.detach().requires_grad_() for t in _FORK_CASE["inputs"])
    y = AF.layer_norm(x, x.shape[-1], w, b)
    return y.grad_fn.name(), np.array_equal(y.detach().numpy(), _FORK_CASE["expected"].numpy())


@needs_cpp
@pytest.mark.native_rule
@pytest.mark.parametrize("shape", [(8, 4096), (3, 30000)])
def test_recorded_layer_norm_rows_across_threads_and_in_a_forked_child(shape):
    """The rule's node with its forward's rows across torch's threads (16K elements and
    more): the same bits in Python threads at once; a small one's forward in a forked
    child (torch's backward kernel, as torch.nn's LayerNorm's, would hang there: GNU
    OpenMP starts no team in a child forked after one ran)."""
    x, _, w, b = _inputs(shape, torch.float32, 8)
    expected = _recorded_layer_norm(x, w, b)
    assert expected[0] == "LayerNormBackward"
    for got in _in_threads(3, lambda: _recorded_layer_norm(x, w, b)):
        _same_bits(got[1:], expected[1:])
    # (a call worth threads is turned down there: torch's kernel, which would hang too)
    small = [t[..., :512].contiguous() for t in (x[:2], w, b)]
    _FORK_CASE.update(inputs=small, expected=_recorded_layer_norm(*small)[1])
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply_async(_recorded_forward_in_forked_child).get(120) == ("LayerNormBackward", True)
    finally:
        _FORK_CASE.clear()


@needs_cpp
def test_small_row_norm_calls_go_there_from_functional_in_plain_eager_only():
    """functional offers a small row norm's call to the C++ path itself, past ``_forward``
    and the op's entry (``_Entry.eager_cpp``), in plain eager execution on addnorm's own
    choice of backend only: a forced backend goes the op's way, a forward-AD dual input
    gets its tangent, a dispatch mode sees the custom op."""
    import torch.autograd.forward_ad as fwAD

    x, _, w, res = _inputs((3, 64), torch.float32, 4, residual=True)
    with _offered_by_functional(ops.row_norm) as offered:
        y = AF.rms_norm(x.clone().requires_grad_(), (64,), w)
        assert _node(y) == "CppFunction" and offered == [True]
        AF.add_rms_norm(x, res, 64, w)
        assert offered == [True, True]
        with addnorm.backend("numba"):
            assert _node(AF.rms_norm(x.clone().requires_grad_(), (64,), w)) == "CppFunction"
        tangent = torch.randn_like(x)
        with fwAD.dual_level():
            jvp = fwAD.unpack_dual(AF.rms_norm(fwAD.make_dual(x, tangent), (64,), w, 1e-6)).tangent
        with SeenOps() as mode:
            AF.rms_norm(x, (64,), w)
        assert offered == [True, True]
    assert "addnorm.row_norm_fwd.default" in mode.seen, mode.seen
    _, expected = torch.func.jvp(lambda t: torch.nn.functional.rms_norm(t, (64,), w, 1e-6), (x,), (tangent,))
    torch.testing.assert_close(jvp, expected)
