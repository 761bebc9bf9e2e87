"""Bad input: a clear error naming the argument, raised before any work, nothing modified."""

import inspect
import re

import numpy as np
import pytest
import torch
from torch import nn

import addnorm
import addnorm.functional as AF


def raises(exc, *words):
    """pytest.raises whose message must contain every word (argument names, values)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


X = torch.randn(4, 6, 8)


@pytest.mark.parametrize("fn", [
    lambda x: AF.layer_norm(x, (8,)),
    lambda x: AF.rms_norm(x, (8,)),
    lambda x: AF.group_norm(x, 2),
    lambda x: AF.batch_norm(x, None, None, training=True),
    lambda x: AF.instance_norm(x),
    lambda x: AF.dyt(x, torch.tensor([0.5])),
    lambda x: AF.scale_norm(x, torch.tensor([1.0])),
])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_or_bool_input(fn, dtype):
    with raises(TypeError, "input", "floating-point", str(dtype)):
        fn(torch.zeros(4, 6, 8, dtype=dtype))


def test_not_a_tensor():
    with raises(TypeError, "input", "torch.Tensor", "list"):
        AF.layer_norm([[1.0, 2.0]], (2,))


@pytest.mark.parametrize("fn", [
    lambda x, w: AF.rms_norm(x, (2,), w),
    lambda x, w: AF.add_rms_norm(x, x.detach(), (2,), w),
    lambda x, w: AF.layer_norm(x, (2,), w),
])
@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_not_a_tensor_while_autograd_records(fn, input_requires_grad):
    """The dispatch rule reads requires_grad and dtypes before the checks: it must let
    anything that is not a tensor through to them, not raise an AttributeError."""
    with raises(TypeError, "weight", "torch.Tensor", "list"):
        fn(torch.randn(3, 2, requires_grad=input_requires_grad), [1.0, 2.0])


@pytest.mark.native_rule  # addnorm's own choice of path, the rule's included
@pytest.mark.parametrize("fn", [
    lambda x, w: AF.rms_norm(x, (2,), w),
    lambda x, w: AF.layer_norm(x, (2,), w),
    lambda x, w: AF.add_layer_norm(x, x, (2,), None, w),
    lambda x, w: AF.group_norm(x.reshape(1, 2, 3, 1).bfloat16().to(memory_format=torch.channels_last), 1, w),
])
@pytest.mark.parametrize("grad", [False, True])
def test_not_a_tensor_on_the_cpp_paths(fn, grad):
    """The calls that go to the C++ eager path before the checks (small row norms, the
    rule's LayerNorm, with or without autograd, and channels-last GroupNorm) get the checks' error
    for a parameter that is no tensor, not the extension's own TypeError."""
    name = "bias" if "add_layer_norm" in inspect.getsource(fn) else "weight"
    with torch.set_grad_enabled(grad), raises(TypeError, name, "torch.Tensor", "list"):
        fn(torch.randn(3, 2, requires_grad=grad), [1.0, 2.0])


def test_not_a_tensor_input_while_autograd_records():
    with raises(TypeError, "input", "torch.Tensor", "list"):
        AF.rms_norm([[1.0, 2.0]], (2,), torch.ones(2, requires_grad=True))


@pytest.mark.parametrize("shape", [(6,), (7, 8), (4, 6, 8, 1), 0, (), [8, -1]])
def test_normalized_shape_mismatch(shape):
    with raises(ValueError, "normalized_shape"):
        AF.layer_norm(X, shape)
    with raises(ValueError, "normalized_shape"):
        AF.rms_norm(X, shape)


def test_normalized_shape_error_names_the_input_shape():
    with raises(ValueError, "normalized_shape", "(7,)", "(4, 6, 8)"):
        AF.layer_norm(X, 7)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_parameter_of_wrong_shape(name):
    with raises(ValueError, name, "(8,)", "(7,)"):
        AF.layer_norm(X, (8,), **{name: torch.ones(7)})


@pytest.mark.parametrize("x_dtype, w_dtype", [
    (torch.float32, torch.float64), (torch.float32, torch.bfloat16), (torch.float64, torch.float32),
    (torch.bfloat16, torch.float16), (torch.float16, torch.float64), (torch.float32, torch.int64),
])
def test_parameter_of_wrong_dtype(x_dtype, w_dtype):
    x = X.to(x_dtype)
    with raises(TypeError, "weight", str(w_dtype)):
        AF.layer_norm(x, (8,), torch.ones(8, dtype=w_dtype))
    with raises(TypeError, "weight", str(w_dtype)):
        AF.group_norm(x, 2, torch.ones(6, dtype=w_dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_parameters_with_reduced_input_are_fine(dtype):
    y = AF.layer_norm(X.to(dtype), (8,), torch.ones(8), torch.zeros(8))
    assert y.dtype == dtype


# eps as torch takes it: torch.nn's own tests pass eps=-0.5 to LayerNorm, GroupNorm and
# RMSNorm; a negative, zero or NaN eps gives torch's result, NaN where var + eps < 0
_EPS_CALLS = {
    "layer_norm": lambda m, x, eps: m.layer_norm(x, (8,), eps=eps),
    "rms_norm": lambda m, x, eps: m.rms_norm(x, (8,), eps=eps),
    "group_norm": lambda m, x, eps: m.group_norm(x, 2, eps=eps),
    "instance_norm": lambda m, x, eps: m.instance_norm(x, eps=eps),
    "add_layer_norm": lambda m, x, eps: (
        m.add_layer_norm(x, x, (8,), eps=eps)[0] if m is AF else m.layer_norm(x + x, (8,), eps=eps)),
}


@pytest.mark.parametrize("norm", _EPS_CALLS)
@pytest.mark.parametrize("eps", [-0.5, 0.0, float("nan"), torch.tensor(1e-3)], ids=["-0.5", "0", "nan", "0-dim tensor"])
def test_eps_is_taken_as_torch_takes_it(backend, norm, eps):
    import torch.nn.functional as F

    x = torch.cat([torch.randn(2, 6, 8) * 3, torch.zeros(2, 6, 8)])  # constant samples: var 0
    ours, theirs = _EPS_CALLS[norm](AF, x, eps), _EPS_CALLS[norm](F, x, eps)
    if norm == "instance_norm" and float(eps) == 0:
        # the one deliberate difference: 0 / 0 is NaN, as in GroupNorm and LayerNorm, where
        # torch's instance_norm (its BatchNorm kernel) gives those channels rstd 0
        assert torch.equal(theirs[2:], torch.zeros(2, 6, 8)) and ours[2:].isnan().all()
        ours, theirs = ours[:2], theirs[:2]
    else:
        assert theirs.isnan().any() == (not float(eps) > 0)  # the case is what it says
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_eps_is_a_number():
    for call in (lambda eps: AF.layer_norm(X, 8, eps=eps), lambda eps: AF.rms_norm(X, 8, eps=eps),
                 lambda eps: AF.group_norm(X, 2, eps=eps), lambda eps: AF.instance_norm(X, eps=eps),
                 lambda eps: AF.scale_norm(X, torch.ones(1), eps=eps),
                 lambda eps: AF.batch_norm(X, torch.zeros(6), torch.ones(6), eps=eps)):
        with raises(TypeError, "eps", "float", "str"):
            call("1e-5")
        with raises(TypeError, "eps", "float", "(1,)"):
            call(torch.tensor([1e-5]))


@pytest.mark.parametrize("momentum", [np.float32(0.3), torch.tensor(0.3), 1], ids=["numpy float32", "0-dim tensor", "int"])
def test_momentum_is_any_float_torch_takes(backend, momentum):
    """momentum as eps: what torch's kernels take for a float (the rule's twin takes it at
    small sizes, so ours must at every size); None is an error naming it, as in torch."""
    import torch.nn.functional as F

    ours, theirs = (torch.zeros(6), torch.ones(6)), (torch.zeros(6), torch.ones(6))
    y = AF.batch_norm(X, *ours, training=True, momentum=momentum)
    torch.testing.assert_close(y, F.batch_norm(X, *theirs, training=True, momentum=momentum))
    torch.testing.assert_close(ours, theirs)
    with raises(TypeError, "momentum", "NoneType"):
        AF.batch_norm(X, *ours, training=True, momentum=None)


@pytest.mark.parametrize("training, eps", [(False, -1e-5), (True, -1e-5), (True, 0.0)])
def test_batch_norm_eps_bounds_are_torch_nn_functionals(training, eps):
    """F.batch_norm's own check: eps > 0 in training, >= 0 in eval (NaN passes there too)."""
    import torch.nn.functional as F

    stats = torch.zeros(6), torch.ones(6)
    with raises(ValueError, "eps", "> 0" if training else ">= 0"):
        AF.batch_norm(X, *stats, training=training, eps=eps)
    with pytest.raises(ValueError):
        F.batch_norm(X, *stats, training=training, eps=eps)
    assert torch.equal(stats[0], torch.zeros(6))
    nan = AF.batch_norm(X, *stats, training=training, eps=float("nan"))
    torch.testing.assert_close(nan, F.batch_norm(X, *stats, training=training, eps=float("nan")), equal_nan=True)


@pytest.mark.parametrize("eps", [-1e-5, float("nan")])
def test_scale_norm_eps_is_at_least_0(eps):
    with raises(ValueError, "eps", ">= 0"):
        AF.scale_norm(X, torch.ones(1), eps=eps)


@pytest.mark.parametrize("groups", [4, 0, -2, 7])
def test_group_norm_groups_must_divide_channels(groups):
    with raises(ValueError, "num_groups", "input.shape[1] = 6", str(groups)):
        AF.group_norm(X, groups)
    with pytest.raises(ValueError):
        addnorm.GroupNorm(groups, 6)(X) if groups > 0 else AF.group_norm(X, groups)


def test_batch_norm_training_with_one_value_per_channel():
    bn = addnorm.BatchNorm1d(6)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with raises(ValueError, "more than 1 value per channel"):
        bn(torch.randn(1, 6))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed call"


def test_wrong_channel_count_leaves_module_unchanged():
    bn = addnorm.BatchNorm2d(5)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with raises(ValueError, "input.shape[1] = 3", "(3,)", "(5,)"):
        bn(torch.randn(2, 3, 4, 4))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed call"
    with raises(ValueError, "input.shape[1] = 3"):
        addnorm.GroupNorm(1, 5)(torch.randn(2, 3, 4))
    with raises(ValueError, "num_features", "5"):
        addnorm.InstanceNorm1d(5, affine=True)(torch.randn(2, 3, 4))


@pytest.mark.parametrize("cls, bad", [
    (addnorm.BatchNorm1d, (2, 5, 3, 3)), (addnorm.BatchNorm2d, (2, 5, 3)), (addnorm.BatchNorm3d, (2, 5, 3, 3)),
    (addnorm.InstanceNorm1d, (2, 5, 3, 3)), (addnorm.InstanceNorm2d, (5, 3)), (addnorm.InstanceNorm3d, (2, 5, 3, 3, 3, 3)),
])
def test_wrong_input_rank(cls, bad):
    with raises(ValueError, "expected", f"{len(bad)}D"):
        cls(5)(torch.randn(bad))


def test_batch_norm_eval_needs_running_stats():
    with raises(ValueError, "running_mean", "training=False"):
        AF.batch_norm(X, None, None, training=False)
    with raises(ValueError, "running_var"):
        AF.batch_norm(X, torch.zeros(6), None, training=True)


def test_instance_norm_with_one_spatial_element():
    with raises(ValueError, "more than 1 spatial element"):
        AF.instance_norm(torch.randn(4, 6, 1))


@pytest.mark.parametrize("fn", [AF.add_layer_norm, AF.add_rms_norm])
def test_add_norm_operands_must_match(fn):
    with raises(ValueError, "residual", "(4, 6, 8)", "(4, 1, 8)"):
        fn(X, torch.randn(4, 1, 8), (8,))
    with raises(TypeError, "residual", "torch.float32", "torch.float64"):
        fn(X, X.double(), (8,))
    with raises(TypeError, "residual", "floating-point"):
        fn(X, X.long(), (8,))


def test_add_norm_module_rejects_mismatch():
    with raises(ValueError, "residual"):
        addnorm.AddRMSNorm(8)(X, torch.randn(8))


def test_dyt_and_scale_norm_arguments():
    with raises(ValueError, "alpha", "one-element"):
        AF.dyt(X, torch.ones(2))
    with raises(ValueError, "bias", "(8,)", "(7,)"):
        AF.dyt(X, torch.ones(1), torch.ones(8), torch.ones(7))
    with raises(ValueError, "weight", "one-element"):
        AF.scale_norm(X, torch.ones(8))


def test_parameters_on_another_device_are_named():
    meta = torch.ones(8, device="meta")
    with raises(ValueError, "weight", "device"):
        AF.layer_norm(X, (8,), meta)


def test_failed_call_modifies_nothing():
    x = X.clone()
    rm, rv = torch.zeros(6), torch.ones(6)
    with pytest.raises(TypeError):
        AF.batch_norm(x, rm, rv, torch.ones(6, dtype=torch.float64), training=True)
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6)) and torch.equal(x, X)
    inorm = addnorm.InstanceNorm1d(6, track_running_stats=True)
    with pytest.raises(ValueError):
        inorm(torch.randn(2, 6, 1))
    assert torch.equal(inorm.running_mean, torch.zeros(6)) and inorm.num_batches_tracked == 0


def test_torch_nn_raises_too_for_the_same_inputs():
    """Where we raise, torch.nn raises: nothing torch accepts is refused (by example)."""
    for ours, theirs in [
        (lambda: AF.layer_norm(X, 7), lambda: nn.functional.layer_norm(X, (7,))),
        (lambda: AF.group_norm(X, 4), lambda: nn.functional.group_norm(X, 4)),
        (lambda: AF.batch_norm(torch.randn(1, 6), None, None, training=True),
         lambda: nn.functional.batch_norm(torch.randn(1, 6), None, None, training=True)),
    ]:
        with pytest.raises((ValueError, TypeError)):
            ours()
        with pytest.raises((ValueError, RuntimeError)):
            theirs()


X4 = torch.randn(4, 6, 8)
MISTAKES = {
    # the same mistake made with torch and with addnorm: (torch's call, ours)
    "layer_norm normalized_shape": (lambda m: m.layer_norm(X4, (7,)), None),
    "layer_norm weight shape": (lambda m: m.layer_norm(X4, (8,), torch.ones(7)), None),
    "layer_norm weight dtype": (lambda m: m.layer_norm(X4, (8,), torch.ones(8, dtype=torch.float64)), None),
    "layer_norm integer input": (lambda m: m.layer_norm(X4.long(), (8,)), None),
    "layer_norm empty normalized_shape": (lambda m: m.layer_norm(X4, ()), None),
    "rms_norm normalized_shape": (lambda m: m.rms_norm(X4, (7,)), None),
    "group_norm not dividing": (lambda m: m.group_norm(X4, 4), None),
    "group_norm one value per group": (lambda m: m.group_norm(torch.randn(1, 4), 4), None),
    "group_norm weight shape": (lambda m: m.group_norm(X4, 2, torch.ones(5)), None),
    "batch_norm running_mean size": (lambda m: m.batch_norm(X4, torch.zeros(5), torch.ones(5)), None),
    "batch_norm running_mean size, training":
        (lambda m: m.batch_norm(X4, torch.zeros(5), torch.ones(5), training=True), None),
    "batch_norm weight size": (lambda m: m.batch_norm(X4, torch.zeros(6), torch.ones(6), torch.ones(5)), None),
    "batch_norm eval without stats": (lambda m: m.batch_norm(X4, None, None, training=False), None),
    "batch_norm one value per channel": (lambda m: m.batch_norm(torch.randn(1, 6), None, None, training=True), None),
    "instance_norm one spatial value": (lambda m: m.instance_norm(torch.randn(2, 3, 1)), None),
    "instance_norm weight size": (lambda m: m.instance_norm(X4, weight=torch.ones(5)), None),
    "instance_norm eval without stats": (lambda m: m.instance_norm(X4, use_input_stats=False), None),
    "not a tensor": (lambda m: m.layer_norm([[1.0, 2.0]], (2,)), None),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_error_is_an_instance_of_what_torch_raises(mistake):
    """Code written against torch catches our error with the class torch raises."""
    import torch.nn.functional as F

    call, _ = MISTAKES[mistake]
    with pytest.raises(Exception) as theirs:
        call(F)
    with pytest.raises(Exception) as ours:
        call(AF)
    expected = theirs.type if theirs.type is not NotImplementedError else RuntimeError
    assert isinstance(ours.value, expected), (
        f"torch raises {theirs.type.__name__}, addnorm {ours.type.__mro__}: {ours.value}")
    assert isinstance(ours.value, (ValueError, TypeError)), "and keeps its own class"


@pytest.mark.parametrize("module", [
    lambda m: m.BatchNorm1d(6)(torch.randn(6)),
    lambda m: m.InstanceNorm3d(6)(X4),
    lambda m: m.GroupNorm(3, 8),
    lambda m: m.LayerNorm(8)(torch.randn(4, 7)),
    lambda m: m.RMSNorm(8)(torch.randn(4, 7)),
    lambda m: m.GroupNorm(2, 6)(torch.randn(4, 5, 3)),
])
def test_module_errors_are_torchs_classes(module):
    with pytest.raises(Exception) as theirs:
        module(nn)
    with pytest.raises(Exception) as ours:
        module(addnorm)
    assert isinstance(ours.value, theirs.type), (theirs.type, ours.type, ours.value)


@pytest.mark.parametrize("bad", [
    lambda: addnorm.ScaleNorm(0),
    lambda: addnorm.ScaleNorm(8, eps=0.0),
    lambda: addnorm.ScaleNorm(8, eps=-1.0),
    lambda: addnorm.DyT((8, 0)),
    lambda: addnorm.DyT(-3),
])
def test_constructor_checks_its_arguments(bad):
    with pytest.raises(addnorm.ArgumentError):
        bad()
