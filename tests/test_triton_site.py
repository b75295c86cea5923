"""The CUDA site kernels (dyrelu/fused/_triton_site.py) in Triton's interpreter against the reference.

A BN + DY-ReLU site through bn_dyrelu with DYRELU_FUSED_BACKEND=triton (every launch runs in the
interpreter on the CPU) against BatchNorm2d followed by DyReLU's reference path: output, input
gradient, every parameter gradient, running statistics. Variants A, B, C; K 1-3 (and fewer dynamic
segments, no intercepts); fp32 and bf16; NCHW and channels_last; N = 1 and 1x1 maps; training and
eval; and variant C's spatial attention (``dyrelu::spatial_pi``) on maps wider than its block. Tiny shapes: the interpreter runs every lane in numpy. Checks that the site kernels ran."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from runs import ROOT

pytest.importorskip("triton")

CODE = textwrap.dedent("""
    import copy, warnings, torch
    from torch import nn
    import dyrelu
    from dyrelu.fused import _triton
    from dyrelu.fused.bn_act import bn_dyrelu
    warnings.simplefilter("error")  # a fallback warning fails the check
    torch.manual_seed(0)

    def run(variant, k, dtype, cl, n, hw, train=True, **kw):
        c = 6
        x = torch.randn(n, c, hw, hw) * 2 + 1
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(dtype)
        bn = nn.BatchNorm2d(c)
        act = dyrelu.DyReLU(c, variant=variant, k=k, reduction=2, hyper_init="random", **kw)
        with torch.no_grad():
            act.fc2.weight.normal_(0, 0.3); bn.weight.uniform_(0.5, 1.5); bn.bias.normal_(0, 0.2)
            bn.running_mean.normal_(); bn.running_var.uniform_(0.5, 2)
        bn.train(train); act.train(train)
        bn2, act2 = copy.deepcopy(bn), copy.deepcopy(act)
        act2.impl = "reference"
        xa, xb = x.clone().requires_grad_(), x.clone().float().requires_grad_()
        ya, yb = bn_dyrelu(xa, bn, act), act2(bn2(xb))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ya.float(), yb, rtol=tol, atol=tol)
        gy = torch.randn_like(yb)
        ya.backward(gy.to(dtype)); yb.backward(gy)
        torch.testing.assert_close(xa.grad.float(), xb.grad, rtol=tol, atol=tol)
        for p1, p2 in zip([*bn.parameters(), *act.parameters()], [*bn2.parameters(), *act2.parameters()]):
            if p2.grad is not None:
                torch.testing.assert_close(p1.grad, p2.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(bn.running_mean, bn2.running_mean)
        torch.testing.assert_close(bn.running_var, bn2.running_var)
        assert bn.num_batches_tracked == bn2.num_batches_tracked

    cases = [(("B", 2, torch.float32, False, 3, 3), {}), (("B", 3, torch.bfloat16, True, 2, 2), {}),
             (("B", 1, torch.float32, True, 1, 3), {}),                       # N = 1
             (("A", 2, torch.float32, True, 2, 1), {}),                       # 1x1 maps
             (("A", 3, torch.bfloat16, False, 2, 2), dict(use_bias=False, dynamic_segments=1)),
             (("C", 2, torch.float32, True, 2, 3), {}), (("C", 3, torch.bfloat16, False, 2, 1), {})]
    for args, kw in cases:
        run(*args, **kw)
    run("B", 2, torch.float32, True, 2, 3, train=False)              # running statistics

    # Eq. 4 alone on maps wider than one block (1,024 positions), the cutoff at 1 active (small tau)
    from dyrelu._hyper import spatial_attention
    for dtype in (torch.float32, torch.bfloat16):
        z = (torch.randn(2, 1, 40, 40) * 3).to(dtype)
        tau = torch.tensor(0.5)
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        pa, pb = torch.ops.dyrelu.spatial_pi(za, tau), spatial_attention(zb, tau)
        assert pa.dtype == dtype and (pb == 1).any() and (pb < 1).any()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(pa.float(), pb.float(), rtol=tol, atol=tol)
        g = torch.randn_like(pb)
        pa.backward(g); pb.backward(g)
        torch.testing.assert_close(za.grad.float(), zb.grad.float(), rtol=tol, atol=tol)
    ran = {key[0] for key in _triton._OK}
    want = {"_row_moments_kernel", "_site_fwd1_kernel", "_site_fwd2_kernel", "_site_bwd1_kernel", "_site_bwd2_kernel",
            "_site_dx_kernel", "_running_kernel", "_site_z_kernel", "_site_zgrad_kernel", "_pi_fwd_kernel", "_pi_bwd_kernel"}
    assert want <= ran, want - ran
    print("ok")
""")


def test_site_kernels_in_the_interpreter_match_the_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", DYRELU_FUSED_BACKEND="triton", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
