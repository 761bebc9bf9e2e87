"""addnorm.backends() and addnorm.backend(name)."""

import pytest
import torch

import addnorm
import addnorm.functional as AF
from addnorm import _backend


def test_backends_reports_every_known_backend():
    b = addnorm.backends()
    assert set(b) == {"torch", "numba", "triton"}
    assert b["torch"] is True
    assert all(isinstance(v, bool) for v in b.values())


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="numba.*torch.*triton.*'cuda'"):
        with addnorm.backend("cuda"):
            pass


def test_unavailable_backend_is_refused_at_entry(monkeypatch):
    monkeypatch.setitem(_backend._AVAILABLE, "triton", False)
    with pytest.raises(RuntimeError, match="triton.*not available"):
        with addnorm.backend("triton"):
            pass


def test_forcing_nests_and_restores():
    cpu = torch.device("cpu")
    default = _backend.select(cpu)
    with addnorm.backend("torch"):
        assert _backend.select(cpu) == "torch"
        with addnorm.backend("torch"):
            assert _backend.select(cpu) == "torch"
        assert _backend.select(cpu) == "torch"
    assert _backend.select(cpu) == default
    with pytest.raises(KeyError):
        with addnorm.backend("torch"):
            raise KeyError("inside")
    assert _backend.select(cpu) == default


def test_default_is_the_fastest_available(monkeypatch):
    assert _backend.select(torch.device("cpu")) == ("numba" if _backend._AVAILABLE["numba"] else "torch")
    monkeypatch.setitem(_backend._AVAILABLE, "numba", False)
    assert _backend._defaults()["cpu"] == "torch"
    monkeypatch.setitem(_backend._AVAILABLE, "triton", False)
    assert _backend._defaults()["cuda"] == "torch"


def test_a_retired_backend_stops_being_the_default(monkeypatch):
    for registry in ("_AVAILABLE", "_RETIRED", "_DEFAULT"):  # retire on copies
        monkeypatch.setattr(_backend, registry, dict(getattr(_backend, registry)))
    monkeypatch.setitem(_backend._AVAILABLE, "numba", True)
    _backend._DEFAULT.update(_backend._defaults())
    assert _backend.select(torch.device("cpu")) == "numba"
    _backend.retire("numba", "a test retired it")
    assert _backend.select(torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="a test retired it"):
        with addnorm.backend("numba"):
            pass


def test_ops_run_on_the_chosen_backend(monkeypatch, python_path):
    """The op really calls the backend's kernel: a spy backend records the call (on the
    Python path: the C++ eager path calls numba's kernels by address)."""
    calls = []
    real = _backend.reference.row_norm_forward

    class Spy:
        @staticmethod
        def row_norm_forward(*args):
            calls.append("fwd")
            return real(*args)

    monkeypatch.setitem(_backend._loaded, "numba", Spy)
    monkeypatch.setitem(_backend._AVAILABLE, "numba", True)
    x = torch.randn(3, 4, requires_grad=True)
    with addnorm.backend("numba"):
        y = AF.rms_norm(x, (4,))
        y.sum().backward()  # Spy lacks the backward: the reference runs it
    assert calls == ["fwd"]
    assert x.grad is not None
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (4,)))
