"""LARS: the trust-ratio update by hand, exclusion of 1-D tensors, and equality with SGD where excluded."""

import pytest
import torch

from jobs.lars import LARS


def test_adapted_tensor_follows_the_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    w.grad = torch.tensor([[0.0, 1.0]])
    lr, wd, eta = 0.5, 0.1, 0.01
    LARS([w], lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta).step()
    d = torch.tensor([[0.0, 1.0]]) + wd * torch.tensor([[3.0, 4.0]])  # g + wd * w = (0.3, 1.4)
    ratio = eta * 5.0 / d.norm()
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 4.0]]) - lr * ratio * d)


def test_biases_are_plain_sgd_with_momentum_and_no_decay():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    lars = LARS([a], lr=0.1, momentum=0.9, weight_decay=0.5)
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a.data, b.data)


@pytest.mark.parametrize("exclude, adapted", [(True, False), (False, True)])
def test_group_flag_overrides_the_ndim_rule(exclude, adapted):
    w2d = torch.nn.Parameter(torch.ones(2, 2))
    b1d = torch.nn.Parameter(torch.ones(2))
    w2d.grad, b1d.grad = torch.ones(2, 2), torch.ones(2)
    LARS([{"params": [w2d, b1d], "lars_exclude": exclude}], lr=1.0, momentum=0.0, trust_coefficient=0.001).step()
    step = 0.001 * (2.0 / 2.0) if adapted else 1.0  # ratio eta*||w||/||g||; both norms 2 for w2d, sqrt(2) for b1d
    torch.testing.assert_close(w2d.data, torch.full((2, 2), 1.0 - step))
    torch.testing.assert_close(b1d.data, torch.full((2,), 1.0 - step))


def test_zero_weights_take_the_plain_gradient():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=0.1, momentum=0.0).step()
    torch.testing.assert_close(w.data, torch.full((2, 2), -0.1))


def test_nonfinite_gradient_skips_the_update_and_reports_overflow():
    """skip_nonfinite: the trainer's LARS leaves weights and momentum untouched and sets `overflow`, which DeepSpeed's
    engine reads for was_step_applied() (ZeRO stage 0 has no skip of its own)."""
    w = torch.nn.Parameter(torch.ones(2, 2))
    lars = LARS([w], lr=0.1, momentum=0.9, skip_nonfinite=True)
    w.grad = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    lars.step()
    assert lars.overflow and torch.equal(w.data, torch.ones(2, 2)) and not lars.state[w]
    w.grad = torch.ones(2, 2)
    lars.step()
    assert not lars.overflow and not torch.equal(w.data, torch.ones(2, 2))
