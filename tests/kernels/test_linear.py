"""The C++ linear layer (`kernels/cpu/linear.cpp`) against a float64 reference, and its use.

Every shape that exercises a different path of the kernel: full 6 x 4 tiles, each partial tile
of input rows (1-5) and of weight rows (1-3), K not a multiple of 16 (the masked tail), K below
16, more input rows than one pass (96) holds, a bias, and several torch threads splitting the
weight rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.model.layers import Linear
from kernels import cpu
from kernels.backend import get_backend


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    cpu.load()


SHAPES = [  # (rows M, out features N, in features K)
    (1, 1, 1),
    (1, 4, 16),
    (6, 4, 16),
    (7, 9, 33),
    (13, 5632 // 8, 1024),
    (5, 3, 15),
    (2, 2, 17),
    (12, 8, 48),
    (64, 70, 100),
    (31, 257, 704),
    (96, 12, 64),
    (97, 13, 64),
    (301, 30, 40),
]


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_a_float64_reference(m: int, n: int, k: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if with_bias else None
    out = cpu.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # float32 sums of k products of unit normals: error grows like sqrt(k) ulps of the terms
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * k**0.5 * 4)


def test_linear_splits_the_weight_rows_over_threads_to_the_same_result() -> None:
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(9, 300, generator=gen), torch.randn(203, 300, generator=gen), torch.randn(203, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.linear(x, w, b)
        torch.set_num_threads(2)
        two = cpu.linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is one tile's sum, whoever computes it


def test_linear_refuses_what_it_cannot_compute() -> None:
    with pytest.raises(RuntimeError, match="float32"):
        cpu.linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu.linear(torch.randn(8, 2).t(), torch.randn(3, 8), None)
    with pytest.raises(RuntimeError, match=r"\[M, K\]"):
        cpu.linear(torch.randn(2, 8), torch.randn(3, 7), None)


def test_a_model_layer_goes_to_its_kernel_for_rows_by_features_only() -> None:
    calls: list[int] = []

    def kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return F.linear(x, w, b)

    layer = Linear(8, 4, dtype=torch.float32)
    x = torch.randn(5, 8)
    plain = layer(x)
    layer.kernel = kernel
    assert torch.equal(layer(x), plain) and calls == [5]
    layer(torch.randn(2, 3, 8))  # not [rows, features]: F.linear
    assert calls == [5]


def test_the_cpu_backend_offers_the_kernel_where_the_cpu_has_avx512() -> None:
    backend = get_backend("cpu")
    assert (backend.linear is not None) == cpu.linear_native()
    assert get_backend("torch").linear is None  # the reference stays all torch
