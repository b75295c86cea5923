"""How the native CPU kernels are built: as torch operators through torch.utils.cpp_extension, for the
architecture's generic target, never for the build host, so that results (and the library) travel
between machines (issue 20)."""
from __future__ import annotations

import itertools
import platform
import tempfile

import pytest
import torch

from dyrelu.fused import _native

HOST_SPECIFIC = ("native",)  # -march=native, -mtune=native, -mcpu=native


def test_flags_have_no_host_specific_target():
    target_flags = [f for f in _native.FLAGS if f.startswith(("-march=", "-mtune=", "-mcpu="))]
    assert not [f for f in target_flags if f.split("=", 1)[1] in HOST_SPECIFIC], _native.FLAGS
    assert "-ffp-contract=off" in _native.FLAGS  # no FMA contraction: a * b + c rounds twice everywhere
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "-march=x86-64" in _native.FLAGS and "-mtune=generic" in _native.FLAGS, _native.FLAGS


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """_build as in a fresh process, with cpp_extension's load recorded instead of run."""
    calls = []

    def fake_load(build_dir, name):
        calls.append((build_dir, name))
        if build_dir.startswith(str(tmp_path)):
            raise OSError("read-only cache")
        raise RuntimeError("not building in this test")

    monkeypatch.setattr(_native, "_loaded", lambda: False)
    monkeypatch.setattr(_native, "_load", fake_load)
    monkeypatch.setattr(_native, "_find_ninja", lambda: None)
    monkeypatch.setenv("DYRELU_NATIVE_CACHE", str(tmp_path / "cache"))
    return calls


def test_the_build_key_changes_with_the_flags(monkeypatch, fake_build):
    """A library built with other flags (say, an old -march=native one) is never loaded."""
    for flags in (_native.FLAGS, [*_native.FLAGS, "-march=native"]):
        monkeypatch.setattr(_native, "FLAGS", flags)
        with pytest.raises(RuntimeError, match="not building"):
            _native._build()
    names = {name for _, name in fake_build}
    assert len(names) == 2, fake_build


def test_an_unwritable_cache_builds_into_the_temp_directory(fake_build, tmp_path):
    with pytest.raises(RuntimeError, match="not building"):
        _native._build()
    (first, _), (second, _) = fake_build
    assert first.startswith(str(tmp_path / "cache")) and second.startswith(tempfile.gettempdir()), fake_build


def test_no_compiler_is_one_short_reason(monkeypatch, fake_build):
    monkeypatch.setenv("CXX", "no-such-compiler-dyrelu")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler .*no-such-compiler-dyrelu"):
        _native._build()
    assert not fake_build


def _coef_args(dt, k, seg, width, use_bias, with_affine, n=5, c=12):
    """Arguments of dyrelu_cpu::bn_coefs (random statistics and weights)."""
    groups = 2 if use_bias else 1
    m, var = torch.randn(n, c, dtype=dt), torch.rand(c, dtype=dt) + 0.5
    mu = torch.randn(c, dtype=dt) if with_affine else None
    weight, bias = (torch.rand(c, dtype=dt) + 0.5, torch.randn(c, dtype=dt)) if with_affine else (None, None)
    w1, b1 = torch.randn(4, c, dtype=dt), torch.randn(4, dtype=dt)
    w2, b2 = torch.randn(groups * seg * width, 4, dtype=dt), torch.randn(groups * seg * width, dtype=dt)
    init = (torch.tensor([1.0, 0.0, 0.5][:k]), torch.zeros(k), torch.tensor(1.0), torch.tensor(0.5))
    return (m, mu, var, weight, bias, 1e-5, w1, b1, w2, b2, *init, seg, width, use_bias)


def _coef_backward_args(fwd, state, with_z):
    """Arguments of dyrelu_cpu::bn_coefs_backward for bn_coefs(*fwd)'s state (random gradients)."""
    m, mu, var, weight, bias, _, w1, _, w2, _, init_a, _, lambda_a, lambda_b, *shape = fwd
    n, c, k = m.shape[0], m.shape[1], init_a.shape[0]
    cdt = state[0].dtype
    extra = (torch.randn(c, dtype=cdt), torch.randn(c, dtype=cdt)) if with_z else (None, None)
    return (state, torch.randn(n, k, c, dtype=cdt), torch.randn(n, k, c, dtype=cdt), m, mu, var, weight, bias, w1, w2,
            lambda_a, lambda_b, *extra, *shape)


def test_the_coefficient_math_in_cpp_is_the_python_bit_for_bit():
    """dyrelu_cpu::bn_coefs / bn_coefs_backward run the fused BN's coefficient math on the CPU; other
    devices (and DYRELU_FUSED_BACKEND=bn / torch) run ops.py's Python. The same ops in the same order:
    the same bits, so the choice cannot change a result."""
    from dyrelu.fused import ops as fused_ops

    lib = _native.library()
    torch.manual_seed(0)
    for dt, (k, seg), width, use_bias, with_affine, with_z in itertools.product(
            (torch.float32, torch.float64), ((1, 1), (2, 2), (3, 2)), (12, 1), (True, False), (True, False),
            (True, False)):
        fwd = _coef_args(dt, k, seg, width, use_bias, with_affine)
        big_a, big_b, state = lib.bn_coefs(*fwd)
        want_a, want_b, want_state = fused_ops._bn_coefs_math(*fwd)
        bwd = _coef_backward_args(fwd, state, with_z)
        got = [big_a, big_b, *state, *lib.bn_coefs_backward(*bwd)]
        want = [want_a, want_b, *want_state, *fused_ops._bn_coefs_backward(*bwd)]
        assert len(got) == len(want)
        for i, (u, v) in enumerate(zip(got, want)):
            assert u.dtype == v.dtype and torch.equal(u, v), (dt, k, seg, width, use_bias, with_affine, with_z, i)


@pytest.mark.parametrize("batch", [True, False])
def test_the_site_op_in_cpp_is_the_separate_ops_composed_bit_for_bit(batch):
    """dyrelu_cpu::bn_act and bn_act_backward (a whole A / B site per direction) compute what the
    separate kernels and ops.py's Python give when composed: the statistics, the coefficients with their
    state, the apply, its backward, the coefficients' backward from the state, the statistics' gradient."""
    from dyrelu.fused import ops as fused_ops

    lib = _native.library()
    torch.manual_seed(0)
    # rows shorter than a vector loop (7), with a scalar tail (30), longer than one block (517)
    for dt, (k, seg), width, use_bias, length in itertools.product(
            (torch.float32, torch.float64), ((1, 1), (2, 2), (3, 2)), (12, 1), (True, False), (7, 30, 517)):
        x, g = torch.randn(5, 12, length, dtype=dt), torch.randn(5, 12, length, dtype=dt)
        coef = _coef_args(dt, k, seg, width, use_bias, True)
        weight, bias, hyper, shape = coef[3], coef[4], coef[6:14], coef[14:]
        mean, var = (None, None) if batch else (torch.randn(12, dtype=dt), torch.rand(12, dtype=dt) + 0.5)
        y, big_a, big_b, m, mu_b, var_b, state = lib.bn_act(x, mean, var, weight, bias, 1e-5, *hyper, *shape)
        if batch:
            want_m, var_used, want_mu = lib.moments(x)
            assert torch.equal(mu_b, want_mu) and torch.equal(var_b, var_used)
        else:
            want_m, var_used = x.mean(2), var
        want = fused_ops._bn_coefs_math(want_m, mean, var_used, weight, bias, 1e-5, *hyper, *shape)
        got = [y, big_a, big_b, m, *state]
        want = [lib.forward(x, want[0], want[1], None), want[0], want[1], want_m, *want[2]]
        mu, var_used = (mu_b, var_b) if batch else (mean, var)
        grads = lib.bn_act_backward(g, x, big_a, big_b, m, mu, var_used, batch, weight, bias, hyper[0], hyper[2],
                                    hyper[6], hyper[7], state, *shape)
        gx, s_gx, s_g, _ = lib.backward(g, x, big_a, big_b, None, False)
        gm, gvar, *param_grads = fused_ops._bn_coefs_backward(
            state, s_gx, s_g, m, None if batch else mean, var_used, weight, bias, hyper[0], hyper[2], hyper[6],
            hyper[7], None, None, *shape)
        gx = gx + (lib.moments_backward(x, mu, gm, gvar) if batch else (gm / x.shape[2])[:, :, None])
        got += list(grads)
        want += [gx, *param_grads]
        for i, (u, v) in enumerate(zip(got, want)):
            assert u.dtype == v.dtype and torch.equal(u, v), (dt, k, seg, width, use_bias, length, i)


@pytest.mark.parametrize("batch", [True, False])
def test_the_c_site_in_cpp_is_the_python_composition_bit_for_bit(batch):
    """dyrelu_cpu::site_coefs / site_coefs_backward (a site's statistics, coefficients and variant C's
    logits, one call per direction) give what ops.py's Python composition of the same steps gives."""
    from dyrelu.fused import ops as fused_ops

    lib = _native.library()
    torch.manual_seed(0)
    for dt, with_z in itertools.product((torch.float32, torch.float64), (True, False)):
        x = torch.randn(5, 12, 6, 5, dtype=dt)
        coef = _coef_args(dt, 2, 2, 12, True, True)
        weight, bias, hyper, shape = coef[3], coef[4], coef[6:14], coef[14:]
        sw = torch.randn(1, 12, 1, 1, dtype=dt)
        mean, var = (None, None) if batch else (torch.randn(12, dtype=dt), torch.rand(12, dtype=dt) + 0.5)
        x3 = x.view(5, 12, 30)
        got = lib.site_coefs(x3, mean, var, weight, bias, 1e-5, *hyper, sw, *shape)
        m, var_used, mu_b, var_b = fused_ops._site_stats(x, mean, var)
        big_a, big_b, state = fused_ops._bn_coefs_math(m, mean, var_used, weight, bias, 1e-5, *hyper, *shape)
        _, ws, zb = fused_ops._folded_weight(sw, fused_ops._scale(state, weight), state[1], dt)
        z = fused_ops._spatial_z(x, ws, zb).reshape(5, 30)
        want = [big_a, big_b, z, m, mu_b, var_b, *state]
        got = [*got[:6], *got[6]]
        mu, var_used = (mu_b, var_b) if batch else (mean, var)
        g_a, g_b, gz = torch.randn_like(big_a), torch.randn_like(big_b), torch.randn(5, 1, 6, 5, dtype=dt)
        gz = gz if with_z else None
        back = (g_a, g_b, gz, x3, m, mu, var_used, batch, weight, bias, hyper[0], hyper[2], hyper[6], hyper[7], sw,
                state, *shape)
        got += list(lib.site_coefs_backward(*back))
        want_back = fused_ops._site_backward(None, g_a, g_b, gz, x, m, mu, var_used, batch, weight, bias, hyper[0],
                                             hyper[2], hyper[6], hyper[7], sw, state, *shape)
        want += [want_back[0].view(5, 12, 30), *want_back[1:]]
        assert len(got) == len(want)
        for i, (u, v) in enumerate(zip(got, want)):
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), (dt, with_z, i)


def test_the_kernels_are_registered_operators_that_pass_opcheck():
    """Real operators with schemas and fake implementations: what torch.compile, export and an
    AOTInductor package need (ctypes gave none of that)."""
    ops = _native.library()
    assert ops is not None  # CI has a C++ compiler and ninja
    torch.manual_seed(0)
    n, c, l, k = 2, 6, 40, 2
    x, g = torch.randn(n, c, l), torch.randn(n, c, l)
    a, b = torch.randn(n, k, c), torch.randn(n, k, c)
    pi = torch.rand(n, 1, l)
    w, bias, gz = torch.randn(c), torch.randn(1), torch.randn(n, l)
    w1, b1, w2, b2 = torch.randn(3, c), torch.randn(3), torch.randn(2 * k * c, 3), torch.randn(2 * k * c)
    off, scale = torch.randn(2 * k * c), torch.randn(2 * k * c)
    cases = [
        (ops.forward, (x, a, b, pi)), (ops.forward, (x, a, None, None)), (ops.forward_, (x.clone(), a, b, None)),
        (ops.backward, (g, x, a, b, pi, True)), (ops.backward, (g, x, a, None, None, False)),
        (ops.row_moments, (x,)), (ops.moments, (x,)), (ops.moments_backward, (x, x[0, :, 0], g[:, :, 0], g[0, :, 0])),
        (ops.spatial, (x, w, bias)), (ops.spatial_backward, (x, w, gz)),
        (ops.site, (x, w1, b1, w2, b2, off, scale, k, c)), (ops.site_, (x.clone(), w1, b1, w2, b2, off, scale, k, c)),
        (ops.moments_backward_, (g.clone(), x, x[0, :, 0], g[:, :, 0], g[0, :, 0])),
    ]
    coef = _coef_args(torch.float32, k, k, c, True, True, c=c)
    cases += [(ops.bn_coefs, coef), (ops.bn_coefs_backward, _coef_backward_args(coef, ops.bn_coefs(*coef)[2], True))]
    sw = torch.randn(1, c, 1, 1)
    for mean, var in ((None, None), (coef[1], coef[2])):
        spatial = (x, mean, var, *coef[3:5], 1e-5, *coef[6:14], sw, *coef[14:])
        big_a, big_b, _, m, mu_b, var_b, state = ops.site_coefs(*spatial)
        mu, var_used, batch = (mu_b, var_b, True) if mean is None else (mean, var, False)
        cases += [(ops.site_coefs, spatial),
                  (ops.site_coefs_backward, (big_a, big_b, gz, x, m, mu, var_used, batch, *coef[3:5], coef[6], coef[8],
                                             coef[12], coef[13], sw, state, *coef[14:]))]
        site = (x, mean, var, *coef[3:5], 1e-5, *coef[6:])
        y, big_a, big_b, m, mu_b, var_b, state = ops.bn_act(*site)
        mu, var_used, batch = (mu_b, var_b, True) if mean is None else (mean, var, False)
        cases += [(ops.bn_act, site), (ops.bn_act_backward, (g, x, big_a, big_b, m, mu, var_used, batch, *coef[3:5],
                                                             coef[6], coef[8], coef[12], coef[13], state, *coef[14:]))]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_input_is_a_clear_error_not_a_crash():
    ops = _native.library()
    x = torch.randn(2, 4, 9)
    with pytest.raises(RuntimeError, match="K <= 3"):
        ops.forward(x, torch.randn(2, 4, 4), None, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.forward(x.transpose(1, 2).contiguous().transpose(1, 2), torch.randn(2, 2, 4), None, None)


def test_every_instruction_set_computes_the_same_bits():
    """The kernels run with the best vector instructions the CPU has (AVX-512, AVX2, else the build's
    generic target), and their sums keep a fixed number of lanes in a fixed order, so every level
    gives the same result bit for bit: the same seed trains to the same numbers on any x86-64 CPU."""
    ops = _native.library()
    best = ops.isa_level(2)
    torch.manual_seed(0)
    try:
        for dt in (torch.float32, torch.float64):
            for (n, c, l), k in (((3, 8, 1027), 2), ((2, 5, 49), 3), ((4, 6, 300), 1)):
                x, g = torch.randn(n, c, l, dtype=dt), torch.randn(n, c, l, dtype=dt)
                a, b = torch.randn(n, k, c, dtype=dt), torch.randn(n, k, c, dtype=dt)
                pi, w, bias = torch.rand(n, 1, l, dtype=dt), torch.randn(c, dtype=dt), torch.randn(1, dtype=dt)
                gz = torch.randn(n, l, dtype=dt)
                w1, b1 = torch.randn(4, c, dtype=dt), torch.randn(4, dtype=dt)
                w2, b2 = torch.randn(2 * k * c, 4, dtype=dt), torch.randn(2 * k * c, dtype=dt)
                off, scale = torch.randn(2 * k * c, dtype=dt), torch.randn(2 * k * c, dtype=dt)
                results = []
                for level in range(best + 1):
                    assert ops.isa_level(level) == level
                    results.append([ops.forward(x, a, b, pi), *ops.backward(g, x, a, b, pi, True),
                                    *ops.backward(g, x, a, None, None, False)[:3], *ops.row_moments(x),
                                    ops.spatial(x, w, bias), *ops.spatial_backward(x, w, gz),
                                    ops.site(x, w1, b1, w2, b2, off, scale, k, c)])
                for level, got in enumerate(results[1:], 1):
                    for i, (u, v) in enumerate(zip(results[0], got)):
                        assert torch.equal(u, v), (dt, n, c, l, k, level, i)
    finally:
        ops.isa_level(2)


def test_the_statistics_ops_are_their_python_composition():
    """dyrelu_cpu::moments / moments_backward are ops.py's moments math around the row-moments and
    apply kernels, in C++: the same ATen ops in the same order, the same bits."""
    lib = _native.library()
    torch.manual_seed(0)
    for dt in (torch.float32, torch.float64):
        x = torch.randn(3, 5, 47, dtype=dt)
        n, c, l = x.shape
        m, v = lib.row_moments(x)
        mu = m.mean(0)
        want = (m, v.mean(0) + (m - mu).square().mean(0), mu)
        for u, w in zip(lib.moments(x), want):
            assert torch.equal(u, w)
        g_m, g_var = torch.randn(n, c, dtype=dt), torch.randn(c, dtype=dt)
        for gm, gv in ((g_m, g_var), (None, g_var), (g_m, None)):
            alpha = torch.zeros(c, dtype=dt) if gv is None else gv * (2.0 / (n * l))
            beta = -(alpha * mu)
            beta = beta.expand(n, c) if gm is None else gm / l + beta
            want = lib.forward(x, alpha.expand(n, c).reshape(n, 1, c).contiguous(), beta.reshape(n, 1, c).contiguous(),
                               None)
            assert torch.equal(lib.moments_backward(x, mu, gm, gv), want)
