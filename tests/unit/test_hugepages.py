"""KV pools on huge pages: the same zeros, a huge-page-aligned start, small tensors left alone.

Whether the kernel then grants huge pages depends on the host (THP mode, fragmentation), so that
is measured in docs/engine.md, not asserted here."""

from __future__ import annotations

import sys

import pytest
import torch

from common import hugepages
from common.kv_pool import KVLayout, KVPool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_large_cpu_tensor_is_zeros_starting_on_a_huge_page(dtype: torch.dtype) -> None:
    shape = (1024, 16, 4, 64)  # 16 MiB in float32, 8 MiB in bfloat16: past MIN_BYTES
    tensor = hugepages.zeros(shape, dtype, torch.device("cpu"))
    assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    assert not tensor.any()
    if sys.platform.startswith("linux"):
        assert tensor.data_ptr() % hugepages.HUGE_PAGE == 0
    tensor[-1, -1, -1, -1] = 1  # the whole extent is writable, and its own
    assert tensor.sum().item() == 1


def test_a_small_tensor_is_an_ordinary_one() -> None:
    tensor = hugepages.zeros((3, 5), torch.float16, torch.device("cpu"))
    assert tensor.shape == (3, 5) and tensor.dtype == torch.float16 and not tensor.any()
    assert tensor.untyped_storage().nbytes() == 3 * 5 * 2  # not over-allocated


def test_a_kv_pool_keeps_its_shape_and_budget_on_huge_pages() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.float32)
    blocks = layout.blocks_for_budget(64 * 2**20)
    pool = KVPool(layout, blocks, torch.device("cpu"))
    assert pool.nbytes == blocks * layout.bytes_per_block
    for cache in pool.k + pool.v:
        assert cache.shape == (blocks, 16, 4, 64) and not cache.any()
    pool.k[0][5] = 1.0
    assert not pool.k[1].any() and not pool.v[0].any()  # every layer its own memory


def test_rehome_moves_parameters_with_their_values_and_keeps_tied_ones_tied() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(4096, 512), torch.nn.Linear(512, 4096, bias=True))
    model[1].weight = model[0].weight  # tied, as an LM head to its embedding
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pointers = {p.data_ptr() for p in model.parameters()}
    hugepages.rehome(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.is_contiguous()
    assert model[1].weight is model[0].weight
    assert {p.data_ptr() for p in model.parameters()}.isdisjoint(pointers)  # moved
    starts = sorted(p.data_ptr() for p in model.parameters())
    assert starts[-1] - starts[0] < 8 * 2**20 + 64  # one region, parameters side by side
    x = torch.tensor([1, 2, 3])
    assert model(x).shape == (3, 4096)


def test_rehome_leaves_a_small_module_where_it_is() -> None:
    layer = torch.nn.Linear(16, 8)
    pointer = layer.weight.data_ptr()
    hugepages.rehome(layer)
    assert layer.weight.data_ptr() == pointer
