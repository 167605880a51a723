"""The output buffer pool: reuse after a tensor dies, never while it lives, bounded idle memory."""
from __future__ import annotations

import gc
import threading

import pytest
import torch

import lossgraph as lg
from lossgraph import buffers
from lossgraph.buffers import BufferPool, size_class
from conftest import BACKENDS

MB = 1 << 20


def test_size_classes_round_up_by_at_most_an_eighth():
    for n in (MB, MB + 1, 3 * MB + 12345, 129 * MB - 7, 403_000 * 80 * 4):
        c = size_class(n)
        assert n <= c <= n * 1.125 + 4096 and c % 4096 == 0
        assert size_class(c) == c


def test_block_is_reused_once_the_tensor_and_its_views_die():
    pool = BufferPool(64 * MB)
    t = pool.empty((512, 1024), torch.float32)
    ptr, view = t.data_ptr(), t[3:, :7]
    del t
    other = pool.empty((512, 1024), torch.float32)   # `view` still holds the first block
    assert other.data_ptr() != ptr
    other.fill_(1.0)
    view.fill_(2.0)
    assert bool((other == 1.0).all())
    del view
    again = pool.empty((500, 1000), torch.float32)   # a slightly smaller request, same class
    assert again.data_ptr() == ptr and pool.stats["reused"] == 1
    assert again.shape == (500, 1000) and again.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_pooled_tensors_hold_their_values(dtype):
    pool = BufferPool(64 * MB)
    t = pool.empty((1024, 300), dtype)
    assert t.dtype == dtype and t.shape == (1024, 300)
    src = torch.arange(t.numel()).reshape(t.shape).to(dtype)
    t.copy_(src)
    assert torch.equal(t, src)


def test_idle_memory_is_bounded_oldest_first():
    pool = BufferPool(5 * MB)
    ts = [pool.empty((MB // 2,), torch.float32) for _ in range(3)]   # 2 MiB each
    del ts
    gc.collect()
    assert pool.idle_bytes <= 5 * MB and pool.stats["evicted"] == 1
    too_big = pool.empty((2 * MB,), torch.float32)                    # 8 MiB: never kept
    del too_big
    assert pool.idle_bytes <= 5 * MB
    pool.clear()
    assert pool.idle_bytes == 0


def test_small_requests_and_a_disabled_pool_use_torch_empty():
    pool = BufferPool(64 * MB)
    small = pool.empty((100, 80), torch.float32)
    off = BufferPool(0).empty((MB,), torch.float32)
    del small, off
    assert pool.stats == {"reused": 0, "mapped": 0, "evicted": 0}


def test_release_from_another_thread():
    pool = BufferPool(64 * MB)
    box = [pool.empty((MB,), torch.float32)]
    ptr = box[0].data_ptr()
    th = threading.Thread(target=box.clear)
    th.start()
    th.join()
    assert pool.empty((MB,), torch.float32).data_ptr() == ptr


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs a C compiler")
def test_gradients_come_from_the_pool_and_go_back_to_it():
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8192, 80, generator=g) * 2).requires_grad_(True)   # a 2.5 MiB gradient
    y = torch.randint(0, 81, (8192,), generator=g)
    loss(x, y).backward()
    first, ptr = x.grad.clone(), x.grad.data_ptr()
    x.grad = None                                  # optimizer.zero_grad(set_to_none=True)
    reused = buffers.POOL.stats["reused"]
    loss(x, y).backward()
    assert x.grad.data_ptr() == ptr and buffers.POOL.stats["reused"] == reused + 1
    assert torch.equal(x.grad, first)
    kept = x.grad                                   # a live gradient is never handed out again
    x.grad = None
    loss(x, y).backward()
    assert x.grad.data_ptr() != kept.data_ptr() and torch.equal(kept, first)
