"""Global batch norm on CPUs (gloo): two ranks with half a batch each give the gradients of one
process on the whole batch. Checked in float64, where the comparison is exact."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dyrelu
from engine.sync_bn import GlobalBatchNorm2d, convert_global_batchnorm


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), dyrelu.build_act("dyrelu_b", 8),
        torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), dyrelu.build_act("dyrelu_c", 8),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    ).double()


def _grads(model, x, y, rank, world):
    loss = torch.nn.functional.cross_entropy(model(x[rank::world]), y[rank::world])
    loss.backward()
    grads = []
    for p in model.parameters():
        dist.all_reduce(p.grad)
        grads.append(p.grad / world)
    return grads


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 9, 7, dtype=torch.float64), torch.randint(0, 5, (8,))
    model = convert_global_batchnorm(_net())
    assert sum(isinstance(m, GlobalBatchNorm2d) for m in model.modules()) == 2
    grads = _grads(model, x, y, rank, world)
    # Control: plain BatchNorm2d under the same DDP-style gradient averaging normalises each
    # rank's half batch on its own, so it must NOT match the one-process gradients.
    plain = _grads(_net(), x, y, rank, world)
    if rank == 0:
        torch.save({"grads": grads, "plain_grads": plain, "state": model.state_dict()}, out_file)
    dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out)

    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 9, 7, dtype=torch.float64), torch.randint(0, 5, (8,))
    ref = _net()
    order = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    torch.nn.functional.cross_entropy(ref(x[order]), y[order]).backward()
    for g, p in zip(got["grads"], ref.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-10, rtol=1e-8)
    assert not all(torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4) for g, p in zip(got["plain_grads"], ref.parameters()))
    for k, v in ref.state_dict().items():  # running statistics too
        assert torch.allclose(got["state"][k].double(), v.double(), atol=1e-10), k


def test_outside_ddp_it_is_plain_batch_norm():
    """One process (no process group): the converted net computes exactly what the original does,
    outputs, gradients and running statistics, in training mode."""
    assert not dist.is_initialized()
    ref = _net()
    conv = convert_global_batchnorm(copy.deepcopy(ref))
    assert sum(isinstance(m, GlobalBatchNorm2d) for m in conv.modules()) == 2
    assert not any(type(m) is torch.nn.BatchNorm2d for m in conv.modules())
    x = torch.randn(6, 3, 9, 7, dtype=torch.float64)
    for net in (ref, conv):
        net.train()
        net(x).square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), conv.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(ref.named_buffers(), conv.buffers()):
        assert torch.equal(b, c), name
    ref.eval(), conv.eval()
    assert torch.equal(ref(x), conv(x))
