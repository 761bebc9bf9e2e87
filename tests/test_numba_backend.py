"""What the numba backend promises beyond parity: threads, determinism, bfloat16 and
float16 bits."""

import threading

import numpy as np
import pytest
import torch

import addnorm
import addnorm.functional as AF

pytestmark = pytest.mark.skipif(not addnorm.backends()["numba"], reason="numba is not installed")


@pytest.fixture
def threads(monkeypatch, python_path):
    """torch's thread count restored after the test, and every kernel threaded however
    small its work (below ``_ONE_THREAD_BELOW`` elements they run on one thread, and DyT
    and ScaleNorm on the C++ eager path: off here)."""
    from addnorm.kernels import cpu

    monkeypatch.setattr(cpu, "_ONE_THREAD_BELOW", 0)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _grads(fn, *inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return [out.detach()] + [t.grad for t in leaves]


CASES = {
    "layer_norm": (lambda x, w, b: AF.layer_norm(x, (96,), w, b), (300, 96), (96,)),
    "add_rms_norm": (lambda x, r, w: AF.add_rms_norm(x, r, (96,), w), (300, 96), None),
    # torch's summation order (its scratch per task on threads, once on the calling thread)
    "rms_norm_gemma": (lambda x, w, b: AF.rms_norm(x, (96,), w * b, offset=1.0, casting_mode="gemma"),
                       (300, 96), (96,)),
    "group_norm": (lambda x, w, b: AF.group_norm(x, 4, w, b), (5, 8, 9, 7), (8,)),
    "batch_norm": (lambda x, w, b: AF.batch_norm(x, None, None, w, b, True), (5, 8, 9, 7), (8,)),
    "dyt": (lambda x, w, b: AF.dyt(x, torch.tensor([0.8]), w, b), (300, 96), (96,)),
    "scale_norm": (lambda x, w, b: AF.scale_norm(x, w[:1] * b[:1]), (300, 96), (96,)),
}


@pytest.mark.parametrize("name", CASES)
def test_same_bits_every_run_and_thread_count(name, threads):
    fn, shape, pshape = CASES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    extra = [torch.randn(shape, generator=g)] if pshape is None else []
    params = [torch.randn(pshape or (96,), generator=g) for _ in range(1 if pshape is None else 2)]
    with addnorm.backend("numba"):
        torch.set_num_threads(2)
        first = _grads(fn, x, *extra, *params)
        again = _grads(fn, x, *extra, *params)
        torch.set_num_threads(1)
        one_thread = _grads(fn, x, *extra, *params)
    for a, b, c in zip(first, again, one_thread):
        assert torch.equal(a, b) and torch.equal(a, c)


ELEMENTWISE_CASES = {  # p: a parameter row, serving as each one-value and per-column parameter
    "dyt": lambda x, p: AF.dyt(x, p[:1], p, p.flip(0)),
    "scale_norm": lambda x, p: AF.scale_norm(x, p[:1]),
}


@pytest.mark.parametrize("name", ELEMENTWISE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_thread_and_tasks_across_threads_give_the_same_bits(name, dtype, monkeypatch):
    """DyT and ScaleNorm run a call below ``_ONE_THREAD_BELOW`` elements on the calling
    thread (on the C++ eager path where it is built), a larger one in tasks of rows
    across threads: the same bits either way, forward and backward (parameter gradients
    from many row blocks, added in a fixed order), and the float64 reference's values
    within rounding."""
    from addnorm import ops
    from addnorm.kernels import cpu

    fn = ELEMENTWISE_CASES[name]
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(300, 96, generator=g) * 2).to(dtype)  # 10 blocks of ``_ROW_BLOCK`` rows
    p = (torch.rand(96, generator=g) + 0.5).to(dtype)
    before = torch.get_num_threads()
    with addnorm.backend("numba"):
        serial = _grads(fn, x, p)
        monkeypatch.setattr(cpu, "_ONE_THREAD_BELOW", 0)
        monkeypatch.setattr(getattr(ops, name), "cpp", None)
        torch.set_num_threads(2)
        try:
            threaded = _grads(fn, x, p)
        finally:
            torch.set_num_threads(before)
    with addnorm.backend("torch"):
        reference = _grads(fn, x.double(), p.double())
    for s, t, r in zip(serial, threaded, reference):
        assert torch.equal(s, t)
        tol = 2e-2 if dtype is torch.bfloat16 else 2e-5
        torch.testing.assert_close(s.double(), r, rtol=tol, atol=tol * r.abs().max().item())


def test_thread_count_follows_torch(threads):
    import numba

    x = torch.randn(64, 32)
    with addnorm.backend("numba"):
        for n in (1, 2):
            torch.set_num_threads(n)
            AF.rms_norm(x, (32,))
            assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)


def test_small_work_runs_on_the_calling_thread_alone(monkeypatch, python_path):
    """Below ``_ONE_THREAD_BELOW`` elements the forward and the backward run their rows on
    the calling thread, without numba's parallel loop (numba's thread count is then moot
    and left as it is); above it both run parallel loops on torch's thread count.  (On
    the Python path, whose wrappers this watches: the C++ eager path calls the serial
    kernels alone.)"""
    import numba

    from addnorm.kernels import cpu

    serial = []
    for name in ("_row_norm_fwd_at", "_row_norm_bwd_at"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *args, real=real, name=name: serial.append(
            (name[-6:-3], args[-1] is None)) or real(*args))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with addnorm.backend("numba"):
            AF.rms_norm(torch.randn(1, 64, requires_grad=True), (64,)).sum().backward()
            assert serial == [("fwd", True), ("bwd", True)]
            serial.clear()
            x = torch.randn(cpu._ONE_THREAD_BELOW // 64, 64, requires_grad=True)
            AF.rms_norm(x, (64,)).sum().backward()
            threads = min(2, numba.config.NUMBA_NUM_THREADS)  # (one where numba has one)
            assert serial == [("fwd", False), ("bwd", threads == 1)]
            assert numba.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_bfloat16_output_is_one_rounding_of_the_float32_result():
    """The kernel computes in float32 and rounds once, to nearest-even: exactly what
    torch's float32 computation followed by .to(bfloat16) gives."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(257, 384, generator=g).to(torch.bfloat16)
    w = torch.randn(384, generator=g).to(torch.bfloat16)
    with addnorm.backend("numba"):
        ours = AF.rms_norm(x, (384,), w, 1e-6)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(torch.bfloat16)
    mismatch = (ours != expected).float().mean().item()
    assert mismatch < 1e-3, f"{mismatch:.2%} of values differ from one float32->bf16 rounding"


def test_bfloat16_nan_and_rounding_edges():
    """NaN rows stay NaN (as torch writes them); values at exact ties round to even."""
    x = torch.randn(3, 64).to(torch.bfloat16)
    x[1, 5] = float("nan")
    with addnorm.backend("numba"):
        y = AF.layer_norm(x, (64,))
    assert y[1].isnan().all() and not y[0].isnan().any() and not y[2].isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conversions_match_torchs_bit_for_bit(dtype):
    """``ld`` widens every one of the 65,536 bit patterns as torch does, and ``st``
    rounds float32 values of every magnitude (ties, subnormals, overflow, Inf, NaN) to
    the bits torch's ``.to(dtype)`` gives."""
    from numba import njit

    from addnorm.kernels import cpu

    @njit
    def widen(bits, out):
        for i in range(bits.shape[0]):
            out[i] = cpu.ld(bits, i)

    @njit
    def narrow(values, out):
        for i in range(values.shape[0]):
            cpu.st(out, i, values[i])

    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    wide = torch.empty(every.shape, dtype=torch.float32)
    widen(cpu._np(every), wide.numpy())
    expected = every.float()
    assert torch.equal(wide.isnan(), expected.isnan())
    assert torch.equal(wide.nan_to_num().view(torch.int32), expected.nan_to_num().view(torch.int32))

    g = torch.Generator().manual_seed(0)
    magnitudes = 10.0 ** torch.linspace(-45, 38, 200_000)
    values = torch.cat([
        torch.randn(200_000, generator=g) * magnitudes,
        wide[~wide.isnan()] + wide[~wide.isnan()].abs() * 2.0**-9,  # near ties of float16
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0, 1e-8]),
    ])
    out = torch.empty(values.shape, dtype=dtype)
    narrow(values.numpy(), cpu._np(out))
    assert torch.equal(out.view(torch.int16), values.to(dtype).view(torch.int16))


def _in_forked_child(work, threads=1, timeout=120.0):
    """Run ``work()`` (returning a str) in a child forked from this process, with torch
    set to ``threads`` threads there (1: as DataLoader workers do, torch's own OpenMP is
    not fork-safe); its report.  A child still running after ``timeout`` s is killed and
    the test fails: a hang must fail, not stall the suite."""
    import os
    import time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(threads)
            os.write(write, work().encode())
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not finish in {timeout} s")
        time.sleep(0.05)
    assert done[1] == 0
    return os.read(read, 1000).decode()


def _numba_own_openmp() -> bool:
    """Whether the kernels run on numba's own GNU OpenMP layer (a user's choice), which
    cannot run in a forked child; torch's OpenMP threads (``_torch_threads``) can."""
    import numba

    from addnorm.kernels import _torch_threads

    return numba.threading_layer() == "omp" and not _torch_threads.installed()


def test_forked_child_keeps_the_numba_kernels():
    """A DataLoader worker or torch.multiprocessing child forked after the kernels ran:
    on torch's threads or TBB it keeps the numba backend and computes the same bits;
    on numba's own GNU OpenMP it falls back to the reference and warns."""
    import warnings

    from addnorm import _backend

    x = torch.randn(64, 32)
    with addnorm.backend("numba"):
        expected = AF.rms_norm(x, (32,))
        AF.rms_norm(torch.randn(1024, 512), (512,))  # starts the parallel threads in this process

    def child():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = AF.rms_norm(x, (32,))
        return f"{_backend.select(x.device)} {torch.equal(y, expected)} {len(caught)}"

    report = _in_forked_child(child)
    if _numba_own_openmp():
        assert report.startswith("torch True"), report
    else:
        assert report == "numba True 0", report


def test_forked_child_runs_the_parallel_kernels_with_torchs_thread_count():
    """A child forked after the parent's parallel kernels ran, which leaves torch at its
    thread count (where torch's own parallel ops would wait forever on threads the fork
    did not copy, so the child runs none: its inputs are made before the fork, its
    outputs hashed by numpy): every parallel kernel finishes there, with the parent's
    bits."""
    import hashlib

    if _numba_own_openmp():
        pytest.skip("numba's own GNU OpenMP layer retires the numba backend in a forked child")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 512, generator=gen)  # 256K elements: past the one-thread bound
    r, dy = torch.randn_like(x), torch.randn_like(x)
    images = torch.randn(4, 32, 48, 48, generator=gen)
    w = torch.randn(512, generator=gen)
    leaves = [(x.clone().requires_grad_(), w.clone().requires_grad_()) for _ in range(2)]

    def run(leaf, weight):
        y, res = AF.add_rms_norm(leaf, r, (512,), weight)
        # both cotangents given: autograd would fill a missing one with torch's zeros
        torch.autograd.backward([y, res], [dy, r])
        outs = [y, res, leaf.grad, weight.grad, AF.layer_norm(x, (512,)), AF.group_norm(images, 8),
                AF.batch_norm(images, None, None, training=True)]
        return " ".join(hashlib.sha1(t.detach().numpy().tobytes()).hexdigest()[:12] for t in outs)

    with addnorm.backend("numba"):
        expected = run(*leaves[0])
        report = _in_forked_child(lambda: run(*leaves[1]), threads=torch.get_num_threads())
    assert report == expected


def test_tbb_or_torchs_threads_run_the_kernels_where_installed():
    """The kernels run on torch's OpenMP threads where torch has them (Linux builds,
    pip's wheels among them), else on TBB where its wheels exist (a dependency there)."""
    import importlib.metadata
    import os
    import platform

    import numba

    from addnorm.kernels import _torch_threads

    AF.layer_norm(torch.randn(8, 8), (8,))
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return
    if _torch_threads.openmp_runtime() is not None:
        assert _torch_threads.installed() and numba.threading_layer() == "omp"
    elif platform.machine() in ("x86_64", "AMD64"):
        assert importlib.metadata.version("tbb")
        assert numba.threading_layer() == "tbb"


def test_parallel_kernels_run_on_torchs_threads():
    """On torch's OpenMP threads, a parallel loop runs on the threads torch's own ops ran
    on, not on a second pool that would spin beside them, and numba's parallel loops keep
    their meaning there: per-thread reductions, the thread count."""
    import platform
    import subprocess
    import sys

    from addnorm.kernels import _torch_threads, cpu  # noqa: F401  (cpu chooses the layer)

    if _torch_threads.openmp_runtime() is None or not _torch_threads.installed():
        pytest.skip("torch runs on no OpenMP runtime addnorm can share here")
    gettid = {"x86_64": 186, "aarch64": 178}.get(platform.machine())
    if gettid is None:
        pytest.skip("gettid's syscall number is not known here")
    code = f"""if 1:
        import ctypes, os, numpy as np, numba, torch
        from numba import njit, prange
        torch.set_num_threads(2)
        x = torch.randn(2048, 1024)
        (x @ x[:1024]).sum()  # torch's threads started
        torchs = sorted(int(t) for t in os.listdir("/proc/self/task"))
        import addnorm.functional as AF
        y = AF.rms_norm(x, (1024,))  # a parallel kernel (2M elements)
        syscall = ctypes.CDLL(None).syscall
        syscall.restype, syscall.argtypes = ctypes.c_long, [ctypes.c_long]

        @njit(parallel=True)
        def where(out):
            for i in prange(out.shape[0]):
                out[i] = syscall({gettid})

        @njit(parallel=True)
        def total(a):
            s = 0.0
            for i in prange(a.shape[0]):
                s += a[i].sum()
            return s

        tids = np.zeros(64, np.int64)
        where(tids)
        a = np.arange(100_000, dtype=np.float64).reshape(1000, 100)
        numba.set_num_threads(1)
        one = (numba.get_num_threads(), total(a))
        numba.set_num_threads(2)
        print(sorted(set(tids.tolist())), torchs, numba.threading_layer(), one, numba.get_num_threads(), total(a))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    used, torchs, rest = out.split("] ", 2)
    used = [int(t) for t in used.strip("[").split(", ")]
    torchs = [int(t) for t in torchs.strip("[").split(", ")]
    assert len(used) == 2 and set(used) <= set(torchs), out  # both threads, both torch's
    assert rest.split() == ["omp", "(1,", "4999950000.0)", "2", "4999950000.0"], out


def test_thread_count_set_by_another_thread_is_not_taken_for_ones_own():
    """On torch's threads numba's thread count is one for the process: after another
    Python thread set it to 1 (for small work), a large kernel here sets it back."""
    import numba

    from addnorm.kernels import _torch_threads, cpu

    if not _torch_threads.installed():
        pytest.skip("numba's own layers keep a thread count per calling thread")
    full = cpu._threads(1 << 22)
    worker = threading.Thread(target=cpu._threads, args=(1,))
    worker.start()
    worker.join()
    assert numba.get_num_threads() == 1
    assert cpu._threads(1 << 22) == full and numba.get_num_threads() == full


def test_dataloader_fork_workers():
    """A fork-context DataLoader whose dataset normalizes: every worker computes right."""
    import multiprocessing

    from torch.utils.data import DataLoader, Dataset

    norm = addnorm.LayerNorm(48)
    data = torch.randn(16, 10, 48)
    norm(data)  # the parent ran the kernels before forking

    class Normalized(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            with torch.no_grad():
                return norm(data[i])

    loader = DataLoader(Normalized(), batch_size=4, num_workers=2,
                        multiprocessing_context=multiprocessing.get_context("fork"))
    got = torch.cat(list(loader))
    with torch.no_grad():
        torch.testing.assert_close(got, torch.nn.functional.layer_norm(data, (48,), norm.weight, norm.bias))


def test_python_threads_at_once():
    """Several Python threads calling the kernels at the same time get their own results."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(0)
    # 32K elements (the calling thread alone) and 256K (each call starts its own team)
    inputs = [torch.randn(256, 128 if i % 2 else 1024, generator=gen) for i in range(8)]
    with addnorm.backend("numba"):
        expected = [AF.layer_norm(x, x.shape[-1:]) for x in inputs]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                got = list(pool.map(lambda x: AF.layer_norm(x, x.shape[-1:]), inputs))
                assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_loads_and_stores_match_torch_bit_for_bit(dtype):
    """The kernels' ld widens every bit pattern of the dtype exactly; their st narrows
    float32 values (normals, subnormals, ties, overflow, Inf, NaN) to the bits torch's
    .to(dtype) gives."""
    from numba import njit

    from addnorm.kernels.cpu import _np, ld, st

    @njit
    def widen(src, dst):
        for i in range(src.shape[0]):
            dst[i] = ld(src, i)

    @njit
    def narrow(src, dst):
        for i in range(src.shape[0]):
            st(dst, i, src[i])

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    wide = torch.empty(every.shape)
    widen(_np(every), _np(wide))
    expected = every.float()
    nan = expected.isnan()
    assert torch.equal(wide.isnan(), nan)
    assert torch.equal(wide[~nan].view(torch.int32), expected[~nan].view(torch.int32))

    g = torch.Generator().manual_seed(0)
    scales = [1e-9, 1e-7, 1e-5, 1e-3, 1.0, 1e3, 6e4, 1e6, 1e38]
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 65504.0, 65520.0])
    values = torch.cat([torch.randn(100_000, generator=g) * s for s in scales] + [expected, specials])
    ours = torch.empty(values.shape, dtype=dtype)
    narrow(_np(values), _np(ours))
    reference = values.to(dtype)
    nan = reference.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int16), reference[~nan].view(torch.int16))


def test_cache_index_and_data_change_together(tmp_path, monkeypatch):
    """Two processes (here threads, each with its own lock handle) saving different
    specializations into one cold numba cache: without the lock both take data file 1
    and the index names one signature with the other's code (seen as wrong results);
    with it each key loads its own data."""
    import threading
    import time

    from numba.core import caching

    import addnorm.kernels.cpu  # noqa: F401  installs the lock

    real_save_index = caching.IndexDataCacheFile._save_index

    def slow_save_index(self, overloads):  # widen numba's read-modify-write window
        time.sleep(0.2)
        real_save_index(self, overloads)

    monkeypatch.setattr(caching.IndexDataCacheFile, "_save_index", slow_save_index)
    cache = caching.IndexDataCacheFile(str(tmp_path), "kernel-1.py311", ("stamp", 1))
    saves = [threading.Thread(target=cache.save, args=(key, f"code for {key}"))
             for key in ("with-bias", "without-bias")]
    for t in saves:
        t.start()
    for t in saves:
        t.join()
    assert cache.load("with-bias") == "code for with-bias"
    assert cache.load("without-bias") == "code for without-bias"


_CALLEE_THEN_CALLER = """
import sys, torch
from addnorm.kernels import cpu
torch.manual_seed(0)
x, w = torch.randn(3, 40, dtype=torch.float64), torch.rand(40, dtype=torch.float64)
y = torch.empty_like(x)
if sys.argv[1] == "callee":  # the parallel kernel alone, as bench's bandwidth check calls it
    cpu._row_norm_fwd(x.numpy(), None, w.numpy(), None, y.numpy(), None, None, x.numpy()[0, :0], 1e-6, 0.0, 0, None)
else:  # its caller on its parallel path, the process's first kernel: nothing launched the threading layer
    t = cpu._TOKENS[torch.float64]
    cpu._row_norm_fwd_at(3, 40, x.data_ptr(), t, None, w.data_ptr(), t, None, t, y.data_ptr(), t, None, None, 0, t,
                         1e-6, 0.0, 0, None, True)
print(float(y.sum()))
"""


def test_a_caller_compiled_over_a_cached_parallel_kernel_runs_from_the_cache(tmp_path):
    """numba issue #8578 (``_numba_cache``, part 2): a process caches the parallel
    ``_row_norm_fwd`` alone, a second compiles its caller ``_row_norm_fwd_at`` on top of
    it, and a third, fresh, runs that caller first from the cache.  Without the caller
    inheriting the callee's reload hook, the third process died of a segmentation
    fault (a call to address 0, the unlaunched layer's symbol)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _CALLEE_THEN_CALLER, step], env=env, capture_output=True,
                           text=True, timeout=300) for step in ("callee", "caller", "caller")]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout

_COMPILE_TOGETHER = """
import os, sys, time
import numpy as np
from numba.core import event
from addnorm.kernels import cpu

compiled = []
class Compiles(event.Listener):
    def on_start(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__name__)
    def on_end(self, ev):
        pass

event.register("numba:compile", Compiles())
folder, me = sys.argv[1], sys.argv[2]
open(os.path.join(folder, "ready-" + me), "w").close()
while len([f for f in os.listdir(folder) if f.startswith("ready-")]) < 2:  # both start together
    time.sleep(0.001)
out = np.empty(300, dtype=np.float32)
cpu._sum_chunks(np.ones((5, 300)), out)
print(compiled.count("_sum_chunks"), float(out.sum()))
"""


def test_two_processes_that_want_one_specialization_compile_it_once(tmp_path):
    """``_numba_cache`` part 3: two processes started together on an empty cache, each
    running the same kernel for the same types, compile it once between them: the
    second waits for the first's compile and loads it from the cache."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = [subprocess.Popen([sys.executable, "-c", _COMPILE_TOGETHER, str(tmp_path), str(i)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, outs):
        assert run.returncode == 0, err[-2000:]
    compiles, sums = zip(*(out.split() for out, _ in outs))
    assert sorted(compiles) == ["0", "1"] and sums == ("1500.0", "1500.0"), outs


ROW_CASES = {
    "layer_norm": lambda x, r, w, b: AF.layer_norm(x, x.shape[-1:], w, b),
    "add_layer_norm": lambda x, r, w, b: AF.add_layer_norm(x, r, x.shape[-1:], w, b)[0],
    "rms_norm": lambda x, r, w, b: AF.rms_norm(x, x.shape[-1:], w),
    "add_rms_norm_llama": lambda x, r, w, b: AF.add_rms_norm(x, r, x.shape[-1:], w, casting_mode="llama")[0],
    "rms_norm_none": lambda x, r, w, b: AF.rms_norm(x, x.shape[-1:], w, offset=1.0, casting_mode="none"),
}


@pytest.mark.parametrize("name", ROW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(700, 64), (9, 5000)])
def test_a_rows_output_does_not_depend_on_the_rows_around_it(name, dtype, shape, monkeypatch):
    """The forward normalizes rows in chunks, on one thread or in tasks across many,
    keeping statistics or not (no_grad): each row's output is the same bits as that row
    normalized alone."""
    from addnorm.kernels import cpu

    fn = ROW_CASES[name]
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    w, b = (torch.randn(shape[1], generator=g).to(dtype) for _ in range(2))
    with addnorm.backend("numba"):
        alone = torch.cat([fn(x[i : i + 1], r[i : i + 1], w, b) for i in range(shape[0])])
        with torch.no_grad():
            serial = fn(x, r, w, b)  # below ``_ONE_THREAD_BELOW``: one call, one thread
        monkeypatch.setattr(cpu, "_ONE_THREAD_BELOW", 0)
        parallel = fn(x, r, w.requires_grad_(), b)  # tasks across threads, statistics kept
    assert torch.equal(serial, alone) and torch.equal(parallel.detach(), alone)


@pytest.mark.parametrize("name", ROW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_streamed_one_by_one_equal_the_same_rows_in_chunks(name, dtype, monkeypatch):
    """A call of ``cpu._STREAMED_BYTES`` or more with rows of ``cpu._WIDE_BYTES`` or
    more normalizes its rows one by one (``cpu._chunk_rows``), a smaller call in chunks of
    rows: the same rows give the same bits either way."""
    from addnorm.kernels import cpu

    d = cpu._WIDE_BYTES // dtype.itemsize
    n = cpu._STREAMED_BYTES // cpu._WIDE_BYTES
    as_numpy = cpu._NUMPY_DTYPES[dtype]
    assert cpu._chunk_rows(np.empty((n, d), as_numpy)) == 1 and cpu._chunk_rows(np.empty((64, d), as_numpy)) > 1
    monkeypatch.setitem(AF._NATIVE_BELOW, "layer_norm", 0)  # our kernel for the small call too
    fn = ROW_CASES[name]
    g = torch.Generator().manual_seed(2)
    x, r = (torch.randn(n, d, generator=g).to(dtype) for _ in range(2))
    w, b = (torch.randn(d, generator=g).to(dtype) for _ in range(2))
    with addnorm.backend("numba"), torch.no_grad():
        streamed = fn(x, r, w, b)
        chunked = fn(x[-64:], r[-64:], w, b)
    assert torch.equal(streamed[-64:], chunked)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 5), (1, 3), (3, 1000), (40, 257), (300, 700), (70, 1024)])
def test_partial_sums_are_added_in_order_in_float64(dtype, shape):
    """``cpu._sum_chunks`` (the parameters' gradients from per-block partial sums) gives
    each column's chunks added in order in float64, rounded once: on the calling thread
    below ``cpu._SUM_SERIAL_BELOW`` values, in column tiles across threads above (300x700
    and 70x1024 here), with a last tile that is not full."""
    from addnorm.kernels import cpu

    part = (np.random.default_rng(0).standard_normal(shape) * 1e3).astype(dtype)
    expected = np.zeros(shape[1], np.float64)
    for row in part:
        expected += row
    out = np.full(shape[1], np.nan, dtype)
    cpu._threads(1 << 30)  # as many threads as torch's
    cpu._sum_chunks(part, out)
    np.testing.assert_array_equal(out, expected.astype(dtype))


def test_statistics_of_rows_whose_first_block_lies_far_off_the_rest():
    """The moments centre on the mean of a row's first block (``cpu._moments``); where
    that lies more than a standard deviation off the row's mean they centre again on the
    mean, so the variance keeps float32's precision (without it rstd's relative error
    here was 5e-7, 7x this bound) and the output is as close to float64 as torch's."""
    from addnorm.kernels import cpu

    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(4, 65536, generator=g, dtype=torch.float64) * 1e-2
    x64[:, : cpu._BLOCK] += 1e4
    x = x64.float()
    y, _, mean, rstd = cpu.row_norm_forward(x, None, None, None, 1e-5, 0.0, False)
    true_rstd = (x64.var(-1, unbiased=False) + 1e-5).rsqrt()
    assert ((rstd.double() - true_rstd) / true_rstd).abs().max() < 2e-7
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-7, atol=0)
    ref = torch.nn.functional.layer_norm(x64, (65536,))
    torch_err = (torch.nn.functional.layer_norm(x, (65536,)).double() - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 1.5 * torch_err
    # GroupNorm's statistics are the same moments, over a group's runs
    xg64 = x64.reshape(4, 16, 64, 64)
    with addnorm.backend("numba"):
        yg = AF.group_norm(xg64.float(), 2)
    ref_g = torch.nn.functional.group_norm(xg64, 2)
    torch_err_g = (torch.nn.functional.group_norm(xg64.float(), 2).double() - ref_g).abs().max()
    assert (yg.double() - ref_g).abs().max() <= 1.5 * torch_err_g


def test_the_forward_with_autograd_runs_the_kernel_the_no_grad_forward_compiled(threads):
    """Compile time is a first use's wait: the statistics output, absent where no
    gradient is recorded, is an empty array there, not None (which would compile a
    second forward for every signature)."""
    from addnorm.kernels import cpu

    torch.set_num_threads(2)
    x = torch.randn(cpu._ONE_THREAD_BELOW // 64, 64, dtype=torch.float64)  # parallel; x[:2] serial
    w = torch.randn(64, dtype=torch.float64)
    with addnorm.backend("numba"):
        with torch.no_grad():
            for rows in (x[:2], x):
                AF.layer_norm(rows, (64,), w)
        compiled = list(cpu._row_norm_fwd_at.signatures)
        for rows in (x[:2], x):
            leaf = rows.clone().requires_grad_()
            AF.layer_norm(leaf, (64,), w).sum().backward()
            assert leaf.grad is not None
    assert cpu._row_norm_fwd_at.signatures == compiled


_COMPILES = """
import numpy as np, torch
import addnorm, addnorm.functional as AF
from addnorm.kernels import cpu
x = torch.rand(4, 8, dtype=torch.float64, requires_grad=True)
with addnorm.backend("numba"):
    AF.rms_norm(x, (8,)).sum().backward()
print(len(cpu._row_norm_fwd.signatures), len(cpu._row_norm_bwd.signatures), len(cpu._torch_mean_square.signatures))
src, dy, rstd = np.random.rand(4, 8), np.random.rand(4, 8), np.ones(4)
cpu._row_norm_bwd(dy, None, src, None, None, rstd, 0.0, 0, np.empty_like(src), None, None)
print([str(sig[-1]) for sig in cpu._row_norm_bwd_block.signatures])
"""


def test_a_call_compiles_only_the_kernels_it_runs(tmp_path):
    """Compile time is a first use's wait.  A call small enough for one thread compiles
    no parallel kernel (``_row_norm_fwd_at``'s ``threaded``), RMSNorm's default casting
    mode no sum in torch's order (``lanes`` None), and the parallel backward
    passes its row block the same integer type as the serial loop does, int64 (prange's
    index is uint64, which compiled each block a second time).  In a fresh process on an
    empty cache: a kernel loaded from the cache does not show its signatures."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _COMPILES], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-3:-1] == ["0 0 0", "['int64']"], out.stdout
