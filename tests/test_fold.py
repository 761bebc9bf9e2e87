"""addnorm.fold_batch_norm: folds only what it can fold exactly, in eval mode, and says
what it left."""

import copy

import pytest
import torch
from torch import nn

import addnorm


def _settled(model: nn.Module, *inputs) -> nn.Module:
    """model with BatchNorm statistics and affine parameters far from the identity, in eval mode."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 2.0, generator=g)
                m.bias.normal_(generator=g)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(*[x * 3 + 1 for x in inputs])
    return model.eval()


def _check_folds(model: nn.Module, x: torch.Tensor, expected: int, **kw) -> nn.Module:
    with torch.no_grad():
        before = model(x)
    assert addnorm.fold_batch_norm(model, **kw) == expected
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    return model


class _ResBlock(nn.Module):
    def __init__(self, c: int, bn=nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), addnorm.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, addnorm.BatchNorm2d])
def test_a_resnet_folds_every_batch_norm_and_keeps_its_outputs(bn):
    x = torch.randn(4, 3, 16, 16)
    model = _settled(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn(8), nn.ReLU(), _ResBlock(8, bn), _ResBlock(8, bn),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), x)
    _check_folds(model, x, 5)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert addnorm.fold_batch_norm(model) == 0  # nothing left


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv1d(3, 6, 3, groups=3), nn.BatchNorm1d(6), (2, 3, 9)),
    (nn.Conv3d(2, 4, 3, stride=2, bias=False), nn.BatchNorm3d(4, affine=False), (2, 2, 7, 7, 7)),
    (nn.Conv2d(3, 4, 1).double(), nn.BatchNorm2d(4).double(), (2, 3, 5, 5)),
])
def test_each_convolution_rank_folds(conv, bn, shape):
    x = torch.randn(shape, dtype=conv.weight.dtype)
    _check_folds(_settled(nn.Sequential(conv, bn), x), x, 1)


def test_training_mode_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(addnorm.ArgumentError, match="eval"):
        addnorm.fold_batch_norm(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_what_cannot_fold_is_left_and_reported(capsys):
    class Shared(nn.Module):  # the conv's output goes to the BatchNorm and to the sum
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    x = torch.randn(2, 4, 6, 6)
    model = _settled(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), Shared(),
                                   nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)), x)
    _check_folds(model, x, 0, verbose=True)
    out = capsys.readouterr().out
    assert "folded 0 of 3" in out
    assert "left 2: not fed by a Conv1d/2d/3d or Linear" in out
    assert "left 3.bn: 3.conv's output goes elsewhere too" in out
    assert "left 5: no stored statistics" in out


def test_a_linear_folds_only_where_its_batch_norm_sees_two_dimensional_input(capsys):
    x = torch.randn(8, 6)
    model = _settled(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), x)
    _check_folds(model, x, 0, verbose=True)
    assert "pass example_inputs" in capsys.readouterr().out
    _check_folds(model, x, 1, example_inputs=(x,))
    # (batch, 5, 6) -> Linear over the last dim, BatchNorm1d(5) over dim 1: they disagree
    x3 = torch.randn(4, 5, 6)
    model = _settled(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(5)), x3)
    _check_folds(model, x3, 0, example_inputs=(x3,))


def test_a_model_that_does_not_trace_falls_back_to_its_sequentials():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                      addnorm.BatchNorm2d(4))

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
                return self.body(x)
            return -self.body(x)

    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(Branchy())
    _check_folds(_settled(Branchy(), x), x, 2)


def test_a_model_without_batch_norm_folds_nothing(capsys):
    assert addnorm.fold_batch_norm(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).eval(), verbose=True) == 0
    assert "folded 0 of 0" in capsys.readouterr().out
    with pytest.raises(addnorm.ArgumentError, match="model must be a torch.nn.Module"):
        addnorm.fold_batch_norm(torch.zeros(3))
