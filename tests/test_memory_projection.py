"""The memory projection (meta device + simulated allocator) against the CPU allocator's count.

One real fp32 step of the tiny preset per plan on the CPU, its working peak read from the
PyTorch profiler's memory events, against the projection made on the meta device with the CPU's
fused attention kernel. Measured here (torch 2.13 CPU): within 3%; the tolerance is 10%.
"""

import pytest
import torch

from benchmarks.project_memory import LiveBytes, check

TOLERANCE = 0.10


def test_simulated_allocator_counts_storages_once_and_frees():
    with LiveBytes() as m:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = a * 2  # 8000 live
        del a  # 4000
        _ = b.view(10, 100)  # a view: no new storage
        b.add_(1)  # in place: none either
        c = torch.empty(500, device="meta")  # 6000
    assert (m.peak, m.live, m.allocs) == (8000, 6000, 3)
    del b, c


def test_views_of_tensors_made_before_the_mode_are_not_allocations():
    """linear() runs on the weight's transposed view: that view shares the weight's storage, made before the
    mode, and must not count (it once did: every linear weight a step touched was counted again)."""
    with torch.device("meta"):
        lin = torch.nn.Linear(1024, 1024, bias=False)  # a 4 MiB weight
        x = torch.zeros(8, 1024)
    with torch.no_grad(), LiveBytes() as m:
        y = lin(x)
        _ = lin.weight.t()
    assert m.peak == y.numel() * 4 == 8 * 1024 * 4
    del y


def test_simulated_allocator_sees_the_backward():
    x = torch.zeros(100, 100, device="meta", requires_grad=True)
    w = torch.zeros(100, 100, device="meta")
    with LiveBytes() as m:
        (x @ w).relu().sum().backward()
    # relu's saved output with its gradient, then that gradient with x.grad: two 40000-byte tensors at a time
    # (w's transposed view in the backward is w's own storage, made before the mode: not an allocation)
    assert 2 * 40000 <= m.peak < 3 * 40000


@pytest.mark.parametrize("plan", ["naive", "fast", "lean"])
def test_projection_matches_cpu_allocator(plan):
    torch.manual_seed(0)
    [row] = check(cases=(("tiny", 4),), plans=(plan,))
    assert row["measured_step_working_bytes"] > 0
    assert abs(row["relative_error"]) <= TOLERANCE, row
