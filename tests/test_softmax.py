"""Softmax ops (the seed's section 1): both algorithms vs torch.softmax and a float64 oracle,
streaming and split paths, -inf handling, gradients, the op contract, torch.compile, bad input.

On CPU the real Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1), so
sizes stay small; the tests marked ``gpu`` run real sizes on CUDA.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from flash_module._runtime import interpreting
from flash_module.kernels import softmax as ksm

from .helpers import assert_flash_rule, max_err

fsm = importlib.import_module("flash_module.softmax")  # the module (the package attribute is the function)

LOWP = [
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
]
LENGTHS = [1, 17, 113, 203, 1000, 4099]
ALGOS = [
    pytest.param("online", None, id="online"),
    pytest.param("tiling", 1, id="tiling-1"),
    pytest.param("tiling", 3, id="tiling-3"),
    pytest.param("tiling", 8, id="tiling-8"),
]
# A streaming config for the fused kernels: rows longer than 64 loop in 64-wide chunks.
STREAM = ksm.SoftmaxConfig(block=64, rows=2, num_warps=2, single=False)


# Tests that call the kernel launchers directly need the kernels: CUDA, or the interpreter on CPU.
kernels = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                             reason="CPU without TRITON_INTERPRET=1 runs the PyTorch path")


def _x(rows, n, dtype, device, scale=4.0):
    return (torch.randn(rows, n, device=device, dtype=torch.float64) * scale).to(dtype)


def _check_lowp(name, ours, x):
    """2x-PyTorch rule against the float64 oracle (PyTorch's error: torch.softmax in x's dtype)."""
    oracle = torch.softmax(x.double(), -1)
    assert_flash_rule(name, ours, oracle, torch.softmax(x, -1), x.dtype)


# ---------------------------------------------------------------------------------------------
# Forward values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,num_splits", ALGOS)
@pytest.mark.parametrize("n", LENGTHS, ids=[f"n{n}" for n in LENGTHS])
def test_forward_fp64_matches_torch(n, algorithm, num_splits, device):
    x = _x(3, n, torch.float64, device)
    y = fsm.softmax(x, -1, algorithm, num_splits)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert max_err(y, torch.softmax(x, -1)) < 1e-14


@pytest.mark.parametrize("algorithm,num_splits", ALGOS)
@pytest.mark.parametrize("n", LENGTHS, ids=[f"n{n}" for n in LENGTHS])
@pytest.mark.parametrize("dtype", LOWP)
def test_forward_lowp_flash_rule(dtype, n, algorithm, num_splits, device):
    x = _x(3, n, dtype, device)
    y = fsm.softmax(x, -1, algorithm, num_splits)
    assert y.dtype == dtype and y.shape == x.shape
    _check_lowp(f"{algorithm}/{num_splits}", y, x)


@kernels
@pytest.mark.parametrize("n", [17, 203, 1000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_online_streaming_path(dtype, n, device):
    """Rows longer than the block: pass 1 keeps a running max/sum, pass 2 rewrites (odd row count)."""
    x = _x(5, n, dtype, device)
    y = ksm.softmax_forward(x, "online", config=STREAM)
    if dtype == torch.float64:
        assert max_err(y, torch.softmax(x, -1)) < 1e-14
    else:
        _check_lowp("online-streaming", y, x)


def test_tiling_more_splits_than_elements(device):
    x = _x(2, 5, torch.float32, device)
    _check_lowp("tiling-64", fsm.softmax(x, -1, "tiling", 64), x)


def test_auto_num_splits():
    assert ksm.auto_num_splits(4096, 32768, 132) == 1  # enough rows: one program per row
    assert ksm.auto_num_splits(1, 2**22, 132) == 4 * 132  # one long row: 4 programs per SM
    assert ksm.auto_num_splits(256, 2**18, 132) == 3
    assert ksm.auto_num_splits(2, 100, 132) == 1  # short rows are never split
    assert ksm.auto_num_splits(1, 2**30, 132) == 4 * 132
    assert ksm.auto_num_splits(1, 2**30, 1000) == ksm.MAX_SPLITS


# ---------------------------------------------------------------------------------------------
# dims, layouts, shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,num_splits", [ALGOS[0], ALGOS[2]])
@pytest.mark.parametrize("dim", [0, 1, 2, -1, -3])
def test_dims_of_3d_tensor(dim, algorithm, num_splits, device):
    x = torch.randn(4, 7, 21, device=device, dtype=torch.float64) * 4
    y = fsm.softmax(x, dim, algorithm, num_splits)
    ref = torch.softmax(x, dim)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert max_err(y, ref) < 1e-14


def test_non_contiguous_input(device):
    x = _x(40, 30, torch.float32, device).t()[:, ::3]  # (30, 14), strided both ways
    for algorithm in fsm.ALGORITHMS:
        assert max_err(fsm.softmax(x, -1, algorithm), torch.softmax(x.double(), -1)) < 1e-6


def test_zero_dim_and_empty(device):
    s = torch.tensor(3.0, device=device)
    assert fsm.softmax(s).shape == () and fsm.softmax(s).item() == 1.0
    assert fsm.softmax(s, 0).item() == 1.0
    for shape, dim in [((0, 7), -1), ((4, 0), -1), ((4, 0), 0), ((2, 0, 3), 2)]:
        x = torch.randn(shape, device=device)
        assert fsm.softmax(x, dim).shape == torch.softmax(x, dim).shape


# ---------------------------------------------------------------------------------------------
# -inf entries
# ---------------------------------------------------------------------------------------------


def _with_inf(n, dtype, device):
    x = _x(4, n, dtype, device)
    x[0, : (3 * n) // 4] = float("-inf")  # the first chunks / splits see only -inf
    x[1, ::2] = float("-inf")
    x[2] = float("-inf")  # all -inf: NaN, as torch
    x[3, : n - 1] = float("-inf")  # one finite entry, at the very end
    return x


INF_PATHS = [
    pytest.param("online", None, None, id="online"),
    pytest.param("online", None, STREAM, id="online-streaming"),
    pytest.param("tiling", 4, None, id="tiling-4"),
]


@kernels
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the all -inf row
@pytest.mark.parametrize("algorithm,num_splits,config", INF_PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_neg_inf_entries(dtype, algorithm, num_splits, config, device):
    x = _with_inf(203, dtype, device)
    y = ksm.softmax_forward(x, algorithm, num_splits, config=config)
    ref = torch.softmax(x.double(), -1)
    assert torch.isnan(ref[2]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))  # only the all -inf row is NaN
    ok = ~torch.isnan(ref)
    assert (y[ok] == 0).eq(ref[ok] == 0).all()
    assert (y[3, -1] == 1).item()
    assert max_err(y[ok], ref[ok]) < (1e-14 if dtype == torch.float64 else 1e-2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_neg_inf_public_api_matches_torch(device):
    x = _with_inf(17, torch.float32, device)
    for algorithm in fsm.ALGORITHMS:
        y = fsm.softmax(x, 1, algorithm)
        ref = torch.softmax(x, 1)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert max_err(y[~torch.isnan(ref)], ref[~torch.isnan(ref)]) < 1e-6


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,num_splits", [ALGOS[0], ALGOS[2]])
@pytest.mark.parametrize("n", [17, 1000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_matches_torch_autograd(dtype, n, algorithm, num_splits, device):
    x = _x(3, n, dtype, device).requires_grad_()
    g = torch.randn(3, n, device=device, dtype=dtype)
    (dx,) = torch.autograd.grad(fsm.softmax(x, -1, algorithm, num_splits), x, g)
    xd = x.detach().double().requires_grad_()
    (oracle,) = torch.autograd.grad(torch.softmax(xd, -1), xd, g.double())
    (lowp,) = torch.autograd.grad(torch.softmax(x, -1), x, g)
    assert dx.dtype == dtype
    assert_flash_rule("dx", dx, oracle, lowp, dtype)


@kernels
@pytest.mark.parametrize("path", ["fused", "streaming", "split-3", "split-8"])
def test_backward_kernel_paths(path, device):
    y = torch.softmax(_x(5, 203, torch.float64, device), -1)
    dy = torch.randn_like(y)
    ref = y * (dy - (y * dy).sum(-1, keepdim=True))
    if path == "fused":
        dx = ksm.softmax_backward(y, dy, 1)
    elif path == "streaming":
        dx = ksm.softmax_backward(y, dy, 1, config=STREAM)
    else:
        dx = ksm.softmax_backward(y, dy, int(path[-1]))
    assert max_err(dx, ref) < 1e-15


def test_grad_through_dim_and_noncontiguous_grad(device):
    x = _x(4, 33, torch.float64, device).reshape(4, 3, 11).requires_grad_()
    y = fsm.softmax(x, 1, "tiling", 2)
    g = torch.randn(11, 3, 4, device=device, dtype=torch.float64).permute(2, 1, 0)  # strided dy
    (dx,) = torch.autograd.grad(y, x, g)
    (ref,) = torch.autograd.grad(torch.softmax(x, 1), x, g)
    assert max_err(dx, ref) < 1e-14


@pytest.mark.parametrize("algorithm,num_splits", [ALGOS[0], ALGOS[3]])
def test_gradcheck_fp64(algorithm, num_splits, device):
    x = _x(3, 21, torch.float64, device, scale=1.0).requires_grad_()
    fn = lambda x: fsm.softmax(x, 0, algorithm, num_splits)
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


def test_gradgradcheck_fp64(device):
    x = _x(2, 13, torch.float64, device, scale=1.0).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: fsm.softmax(x, -1), (x,), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# The op contract and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,algorithm,num_splits", [
    pytest.param(torch.float32, "online", None, id="fp32-online"),
    pytest.param(torch.bfloat16, "tiling", 3, id="bf16-tiling-3"),
    pytest.param(torch.float16, "online", None, id="fp16-online"),
    pytest.param(torch.float64, "tiling", None, id="fp64-tiling-auto"),
])
def test_opcheck_softmax_fwd(dtype, algorithm, num_splits, device):
    x = _x(5, 37, dtype, device)
    torch.library.opcheck(fsm.softmax_fwd, (x, algorithm, num_splits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
def test_opcheck_softmax_bwd(dtype, device):
    y = torch.softmax(_x(5, 37, torch.float32, device), -1).to(dtype)
    dy = torch.randn(5, 37, device=device, dtype=dtype)
    torch.library.opcheck(fsm.softmax_bwd, (y, dy))


def _model(x, w):
    h = fsm.softmax(x @ w, dim=-1) * 2.0
    return fsm.softmax(h, dim=1, algorithm="tiling", num_splits=2).sum(1) + h.mean(1)


@pytest.mark.slow  # ~18 s of compiling on CPU
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    x = torch.randn(4, 6, 40, device=device, requires_grad=True)
    w = torch.randn(40, 40, device=device, requires_grad=True)
    explain = torch._dynamo.explain(_model)(x, w)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    out_c = torch.compile(_model, fullgraph=True)(x, w)
    out_e = _model(x, w)
    assert max_err(out_c, out_e) < 1e-5
    g = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, (x, w), g), torch.autograd.grad(out_e, (x, w), g)):
        assert max_err(a, b) < 1e-4


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input(device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fsm.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="dtype"):
        fsm.softmax(torch.arange(4, device=device))
    with pytest.raises(TypeError, match="dtype"):
        fsm.softmax(torch.ones(4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"\('online', 'tiling'\)"):
        fsm.softmax(x, algorithm="safe")
    for dim in (2, -3):
        with pytest.raises(IndexError, match="out of range"):
            torch.softmax(x, dim)
        with pytest.raises(IndexError, match="out of range"):
            fsm.softmax(x, dim)
    with pytest.raises(TypeError, match="dim"):
        fsm.softmax(x, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        fsm.softmax(x, algorithm="tiling", num_splits=0)
    with pytest.raises(TypeError, match="num_splits"):
        fsm.softmax(x, algorithm="tiling", num_splits=2.0)
    with pytest.raises(ValueError, match="tiling"):
        fsm.softmax(x, algorithm="online", num_splits=2)
    with pytest.raises(ValueError, match="2-D"):
        fsm.softmax_fwd(torch.randn(2, 3, 4, device=device), "online", None)
    with pytest.raises(ValueError, match="softmax_bwd"):
        fsm.softmax_bwd(x, x[:, :2])


def test_benchmark_cli_smoke(tmp_path, capsys):
    """benchmarks/bench_softmax.py on a tiny shape: table, JSON, errors against torch.softmax."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_softmax.py"
    spec = importlib.util.spec_from_file_location("bench_softmax", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = ["--shapes", "3x100", "--dtypes", "fp32", "--passes", "fwd,bwd", "--rep", "20", "--json", str(out)]
    if torch.cuda.is_available():
        argv += ["--device", "cuda"]
    assert bench.main(argv) == 0
    assert "GB/s" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert {(r["impl"], r["pass_"]) for r in records} == {
        (i, p) for i in ("online", "tiling", "torch") for p in ("fwd", "bwd")}
    for r in records:
        assert r["gbps"] > 0 and r["max_err"] < 1e-6, r


# ---------------------------------------------------------------------------------------------
# GPU: real sizes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------


def _check_gpu_rule(name, y, x):
    oracle = torch.softmax(x.float(), -1) if x.dtype != torch.float32 else torch.softmax(x.double(), -1)
    assert_flash_rule(name, y, oracle, torch.softmax(x, -1), x.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", fsm.ALGORITHMS)
@pytest.mark.parametrize("rows,n,dtype", [
    pytest.param(4096, 32768, torch.bfloat16, id="4096x32768-bf16"),
    pytest.param(4096, 4096, torch.float16, id="4096x4096-fp16"),
    pytest.param(1000, 12345, torch.float32, id="1000x12345-fp32"),
    pytest.param(300, 100003, torch.bfloat16, id="300x100003-bf16"),
    pytest.param(8192, 77, torch.float32, id="8192x77-fp32"),
])
def test_gpu_real_sizes(rows, n, dtype, algorithm):
    x = (torch.randn(rows, n, device="cuda") * 4).to(dtype).requires_grad_()
    y = fsm.softmax(x, -1, algorithm)
    _check_gpu_rule(f"{algorithm} fwd", y, x.detach())
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xf = x.detach().float().requires_grad_()
    (oracle,) = torch.autograd.grad(torch.softmax(xf, -1), xf, g.float())
    (lowp,) = torch.autograd.grad(torch.softmax(x, -1), x, g)
    assert_flash_rule(f"{algorithm} dx", dx, oracle, lowp, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 7, 1024], ids=["auto", "7", "1024"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_one_very_long_row_tiling(dtype, num_splits):
    x = (torch.randn(1, 2**22 + 3, device="cuda") * 4).to(dtype).requires_grad_()
    y = fsm.softmax(x, -1, "tiling", num_splits)
    _check_gpu_rule("tiling 1 x 2^22", y, x.detach())
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)  # the backward splits this row automatically
    xf = x.detach().double().requires_grad_()
    (oracle,) = torch.autograd.grad(torch.softmax(xf, -1), xf, g.double())
    (lowp,) = torch.autograd.grad(torch.softmax(x, -1), x, g)
    assert_flash_rule("tiling 1 x 2^22 dx", dx, oracle, lowp, dtype)


@pytest.mark.gpu
def test_gpu_online_long_rows_and_fp64():
    x = torch.randn(3, 2**20 + 5, device="cuda", dtype=torch.float64) * 4
    for algorithm in fsm.ALGORITHMS:
        assert max_err(fsm.softmax(x, -1, algorithm), torch.softmax(x, -1)) < 1e-13
    x = (torch.randn(2, 2**20 + 5, device="cuda") * 4).to(torch.bfloat16)
    _check_gpu_rule("online 2 x 2^20", fsm.softmax(x, -1, "online"), x)


@pytest.mark.gpu
def test_gpu_neg_inf_and_dims():
    x = _with_inf(40000, torch.float32, "cuda")
    for algorithm in fsm.ALGORITHMS:
        y = fsm.softmax(x, -1, algorithm)
        ref = torch.softmax(x.double(), -1)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert max_err(y[~torch.isnan(ref)], ref[~torch.isnan(ref)]) < 1e-6
    x = torch.randn(64, 512, 48, device="cuda", dtype=torch.bfloat16)
    for dim in (0, 1, 2):
        _check_gpu_rule(f"dim {dim}", fsm.softmax(x, dim).movedim(dim, -1), x.movedim(dim, -1))


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """rows * n > 2**31: the row base offsets must be int64 (checks the last rows)."""
    rows, n = 2**16 + 2, 2**15
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    for algorithm in fsm.ALGORITHMS:
        y = fsm.softmax(x, -1, algorithm)
        tail = slice(rows - 3, rows)
        _check_gpu_rule(f"{algorithm} int64", y[tail], x[tail])
        del y
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_compile():
    torch._dynamo.reset()
    x = torch.randn(8, 64, 512, device="cuda", requires_grad=True)
    w = torch.randn(512, 512, device="cuda", requires_grad=True)
    out_c = torch.compile(_model, fullgraph=True)(x, w)
    out_e = _model(x, w)
    assert max_err(out_c, out_e) < 1e-4
