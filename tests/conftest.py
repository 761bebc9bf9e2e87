import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import addnorm

# CI: bounded and derandomized, so the suite's time and outcome are stable; "dev" explores.
settings.register_profile(
    "ci",
    max_examples=20,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = [name for name, ok in addnorm.backends().items() if ok and name != "triton"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test on each backend available here."""
    with addnorm.backend(request.param):
        yield request.param


@contextlib.contextmanager
def python_path_only():
    """Every call on the Python path: the C++ eager path (``addnorm/csrc/eager.cpp``)
    turned off in each op that has one, and back as it was after."""
    from addnorm import ops

    entries = [e for e in vars(ops).values() if isinstance(e, ops._Entry) and e.cpp_name]
    paths = [p for p in vars(ops).values() if isinstance(p, ops._CppPath)]
    saved = [e.cpp for e in entries], [p.function for p in paths]
    for e in entries:
        e.cpp = None
    for p in paths:
        p.function = None
    try:
        yield
    finally:
        for e, c in zip(entries, saved[0]):
            e.cpp = c
        for p, f in zip(paths, saved[1]):
            p.function = f


@pytest.fixture
def python_path():
    """``python_path_only`` for a whole test: the kernels' threaded loops at small sizes."""
    with python_path_only():
        yield


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "native_rule: keep the rule that runs small inputs on torch's own kernel"
    )


@pytest.fixture(autouse=True)
def kernels_at_every_size(request, monkeypatch):
    """The suite tests addnorm's kernels, so the rule that hands small inputs to torch's
    own kernel (``functional._NATIVE_BELOW``, ``_group_norm_rule``, and ``_TWIN_OFF_CPU``
    off the CPU) is off,
    except in tests marked ``native_rule``, which test the rule itself."""
    if request.node.get_closest_marker("native_rule") is None:
        from addnorm import functional

        monkeypatch.setattr(functional, "_NATIVE_BELOW", dict.fromkeys(functional._NATIVE_BELOW, 0))
        # and GroupNorm's rule, which can pick torch's forward kernel at any size
        monkeypatch.setattr(functional, "_group_norm_rule", lambda *args: "group_norm")
        monkeypatch.setattr(functional, "_TWIN_OFF_CPU", {})


@pytest.fixture(autouse=True)
def no_backend_left_forced():
    """``with addnorm.backend(...)`` is process-wide: a test that leaves a backend forced
    (one entered and left in several threads at once, say) fails here, not some later
    test on its worker."""
    from addnorm._backend import _Choice

    yield
    left, _Choice.forced = _Choice.forced, None
    assert left is None, f"a backend was left forced: {left!r}"
