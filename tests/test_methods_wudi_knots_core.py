"""WUDI-Merging, KnOTS and Core Space: NumPy float64 references of their equations, the papers'
equivalence claims as properties, and end-to-end merges of real peft adapters and full fine-tunes.

The references re-derive each method from its description (module docstrings), not from our
code: WUDI differentiates the authors' per-task form of the loss and steps Adam by hand; KnOTS
and Core Space build their spaces with NumPy's SVD and merge there with the NumPy TIES/TSV of
tests/helpers.py and tests/test_core_methods.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import primerge
from primerge.cli import main as cli
from primerge.util.errors import RecipeError
from primerge.methods.base import TensorContext
from primerge.methods.core_space import core_space
from primerge.methods.knots import knots_space
from primerge.methods.stack import LowRank, TaskStack
from primerge.methods.wudi import adam_descent

from helpers import np_ties, run
from lora_zoo import lora_zoo, state  # noqa: F401  (fixture)
from test_core_methods import np_whitened

F64 = torch.float64
EPS64 = np.finfo(np.float64).eps


def lowrank_stack(ranks=(3, 3, 3), m=30, n=22, seed=0, dtype=F64, scale=1.0) -> TaskStack:
    """All tasks as LoRA factors L (m × k) R (k × n)."""
    g = torch.Generator().manual_seed(seed)
    rows = {t: LowRank(scale * torch.randn(m, k, generator=g, dtype=dtype), torch.randn(k, n, generator=g, dtype=dtype))
            for t, k in enumerate(ranks)}
    return TaskStack(torch.zeros(0, m, n, dtype=dtype), [], rows)


def dense_taus(T=3, m=24, n=18, seed=0, scale=1e-2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(T, m, n, generator=g, dtype=F64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- NumPy references


def np_adam(grad, x, steps, lr, b1=0.9, b2=0.999, eps=1e-8):
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t in range(1, steps + 1):
        g = grad(x)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return x


def np_wudi(taus: np.ndarray, steps: int, lr: float) -> np.ndarray:
    """Adam on Σ_i ‖(X − τ_i) τ_iᵀ‖² / ‖τ_i‖² from Σ τ_i, gradient of each task's term in turn."""
    live = [t for t in taus if np.abs(t).sum() > 0]

    def grad(x):
        return sum(2 * ((x - t) @ t.T) @ t / np.sum(t * t) for t in live)

    return np_adam(grad, taus.sum(0), steps, lr)


def np_knots(taus: np.ndarray, density: float = 0.2, representation: str = "sv") -> np.ndarray:
    T, m, n = taus.shape
    U, S, Vt = np.linalg.svd(np.concatenate(list(taus), axis=1), full_matrices=False)
    keep = S > S[0] * max(m, T * n) * EPS64
    U, S, Vt = U[:, keep], S[keep], Vt[keep]
    blocks = np.stack([Vt[:, t * n:(t + 1) * n] for t in range(T)])
    dead = S * np.linalg.norm(blocks, axis=-1) <= S[0] * max(m, T * n) * EPS64  # no share of direction i
    blocks[dead] = 0.0
    if representation == "sv":
        return U @ np_ties(S[:, None] * blocks, density)
    return U @ np.diag(S) @ np_ties(blocks, density)


def np_core_space(factors, inner: str = "tsv") -> np.ndarray:
    B = np.concatenate([L for L, _ in factors], axis=1)
    A = np.concatenate([R for _, R in factors], axis=0)
    UB, SB, _ = np.linalg.svd(B, full_matrices=False)
    _, SA, VAt = np.linalg.svd(A, full_matrices=False)
    UB = UB[:, SB > SB[0] * max(B.shape) * EPS64]
    VA = VAt[SA > SA[0] * max(A.shape) * EPS64].T
    cores = np.stack([UB.T @ L @ R @ VA for L, R in factors])
    if inner == "tsv":
        merged = np_whitened(cores, min(cores.shape[1:]) // len(factors))[1]
    else:
        merged = np_ties(cores, 0.2)
    return UB @ merged @ VA.T


def np_factors(stack: TaskStack):
    return [(f.left.numpy(), f.right.numpy()) for _, f in sorted(stack.lowrank.items())]


# --------------------------------------------------------------------------- WUDI


@pytest.mark.parametrize("lowrank", [False, True])
def test_wudi_matches_numpy_reference(lowrank):
    taus = lowrank_stack(scale=3e-3) if lowrank else TaskStack.of(dense_taus())
    got = run("wudi", taus, steps=120, lr=2e-5)
    expected = np_wudi(taus.dense().numpy(), 120, 2e-5)
    assert np.abs(got.numpy() - expected).max() <= 1e-12 * np.abs(expected).max()
    assert rel(got, taus.sum()) > 0.05  # the steps really moved the merge


def test_wudi_adam_is_torch_adam_with_autograd_on_the_authors_loss():
    taus = dense_taus(T=4, m=16, n=20, seed=2)
    X = torch.nn.Parameter(taus.sum(0).clone())
    optimizer = torch.optim.Adam([X], lr=1e-5)
    norms = taus.reshape(4, -1).square().sum(1)
    for _ in range(50):
        loss = (torch.matmul(X - taus, taus.mT).square() / norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(run("wudi", taus, steps=50), X.detach(), rtol=1e-12, atol=1e-15)


def wudi_loss(x: torch.Tensor, taus: torch.Tensor) -> float:
    return sum(float(((x - t) @ t.T).square().sum() / t.square().sum()) for t in taus)


def test_wudi_lowers_interference_and_stays_near_the_sum():
    taus = dense_taus(T=4, m=40, n=32, seed=1, scale=2e-3).float()
    merged = run("wudi", taus)
    assert wudi_loss(merged.double(), taus.double()) < 0.5 * wudi_loss(taus.sum(0).double(), taus.double())
    assert float((merged - taus.sum(0)).abs().max()) <= 300 * 1e-5 * 1.001  # ≤ lr per step and entry


def test_wudi_adam_reaches_the_minimiser_of_a_quadratic():
    target = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=F64)
    found = adam_descent(lambda x: 2 * (x - target), torch.zeros_like(target), 3000, 1e-2)
    torch.testing.assert_close(found, target, atol=1e-6, rtol=0)


def test_wudi_single_live_task_and_no_steps_are_exact():
    one = lowrank_stack(ranks=(3,), seed=4, dtype=torch.float32)
    rows = {0: LowRank(torch.zeros(30, 0), torch.zeros(0, 22)), 1: one.lowrank[0],
            2: LowRank(torch.zeros(30, 2), torch.randn(2, 22))}  # untouched, live, zero B (peft init)
    stack = TaskStack(torch.zeros(0, 30, 22), [], rows)
    assert torch.equal(run("wudi", stack), one.lowrank[0].dense())
    assert torch.equal(run("wudi", stack, alpha=0.5), 0.5 * one.lowrank[0].dense())
    taus = dense_taus().float()
    assert torch.equal(run("wudi", taus, steps=0), taus.sum(0))


def test_wudi_factored_equals_dense_in_float64():
    """Tighter than the method contract's float32 'factored' check: the two paths agree to 1e-11 in float64."""
    stack = lowrank_stack(ranks=(2, 4, 3), scale=2e-3)
    torch.testing.assert_close(run("wudi", stack, steps=60), run("wudi", stack.dense(), steps=60), rtol=1e-11, atol=1e-15)


def test_wudi_fallback_and_validation():
    bias = dense_taus()[:, 0]
    ctx = TensorContext("layer.bias", "fallback")
    torch.testing.assert_close(run("wudi", bias, ctx, alpha=2.0), 2.0 * bias.mean(0))
    for bad in ({"steps": -1}, {"lr": 0.0}, {"steps": 1.5}, {"iterations": 3}):
        with pytest.raises(RecipeError):
            primerge.get_method("wudi").parameters(bad)


# --------------------------------------------------------------------------- KnOTS


def with_a_zero_task(taus: torch.Tensor) -> torch.Tensor:
    return torch.cat([taus[:1], torch.zeros_like(taus[:1]), taus[1:]])


@pytest.mark.parametrize("representation", ["sv", "v"])
@pytest.mark.parametrize("kind", ["dense", "lowrank", "zero_task"])
def test_knots_ties_matches_numpy_reference(representation, kind):
    """``zero_task``: its V block is rounding noise in the joint SVD, zeroed as a null share."""
    taus = {"dense": lambda: TaskStack.of(dense_taus(m=18, n=10)), "lowrank": lambda: lowrank_stack(ranks=(3, 2, 4)),
            "zero_task": lambda: TaskStack.of(with_a_zero_task(dense_taus(m=40, n=10)))}[kind]()
    got = run("knots", taus, representation=representation, inner_params={"density": 0.3})
    expected = np_knots(taus.dense().numpy(), 0.3, representation)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_knots_space_is_an_exact_aligned_decomposition():
    stack = lowrank_stack(ranks=(2, 4, 3))
    space = knots_space(stack)
    assert space.U.shape == (30, 9) and space.blocks.shape == (3, 9, 22)  # K = Σ k_t, not m
    torch.testing.assert_close(space.U.mT @ space.U, torch.eye(9, dtype=F64))
    rebuilt = space.U @ (space.S.unsqueeze(-1) * space.blocks)
    torch.testing.assert_close(rebuilt, stack.dense(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["knots", "core_space"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_task_arithmetic_inside_is_task_arithmetic(method, lowrank):
    taus = lowrank_stack(ranks=(2, 4, 3)) if lowrank else TaskStack.of(dense_taus())
    expected = run("task_arithmetic", taus.dense(), scale=0.7)
    got = run(method, taus, inner="task_arithmetic", inner_params={"scale": 0.7})
    assert rel(got, expected) <= 1e-13


@pytest.mark.parametrize("method", ["knots", "core_space"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_tsv_inside_equals_full_space_tsv(method, lowrank):
    """Equal-rank adapters (K = T·k) and full fine-tunes: the same directions per task."""
    taus = lowrank_stack(ranks=(3, 3, 3)) if lowrank else TaskStack.of(dense_taus())
    assert rel(run(method, taus, inner="tsv"), run("tsv", taus.dense())) <= 1e-12


@pytest.mark.parametrize("method", ["knots", "core_space"])
def test_prime_with_an_integer_rank_inside_equals_full_space_prime(method):
    stack = lowrank_stack(ranks=(4, 4, 4))
    got = run(method, stack, inner="prime", inner_params={"rank": 2, "alpha": 1.3})
    assert rel(got, run("prime", stack.dense(), rank=2, alpha=1.3)) <= 1e-12


@pytest.mark.parametrize("method", ["knots", "core_space"])
def test_lowrank_stacks_are_never_materialised(method, monkeypatch):
    stack = lowrank_stack(ranks=(2, 4, 3))
    expected = run(method, stack.dense())
    # a stack of dense rows (the aligned task blocks an inner merge sees) costs nothing to "densify"
    monkeypatch.setattr(TaskStack, "dense",
                        lambda self: pytest.fail("materialised the stack") if self.lowrank else self.dense_rows)
    assert rel(run(method, stack), expected) <= 1e-12


def test_knots_ties_differs_from_full_space_ties():
    """Element-wise merges see aligned coordinates: where KnOTS changes the merge."""
    stack = lowrank_stack(ranks=(3, 3, 3))
    assert rel(run("knots", stack), run("ties", stack.dense())) > 0.05


@pytest.mark.parametrize("method", ["knots", "core_space"])
def test_inner_merge_validation(method):
    spec = primerge.get_method(method)
    with pytest.raises(RecipeError, match="whole-model pass"):
        spec.parameters({"inner": "ties", "inner_params": {"trim_scope": "model"}})
    with pytest.raises(RecipeError, match="whole-model pass"):
        spec.parameters({"inner": "prime", "inner_params": {"rank": "auto"}})
    with pytest.raises(RecipeError, match="density"):
        spec.parameters({"inner": "ties", "inner_params": {"density": 2.0}})
    with pytest.raises(RecipeError, match="unknown field 'rnak'"):
        spec.parameters({"inner": "prime", "inner_params": {"rnak": 2}})
    with pytest.raises(RecipeError, match="inner"):
        spec.parameters({"inner": "iso_c"})


@pytest.mark.parametrize("method", ["knots", "core_space"])
def test_non_matrices_get_the_inner_merge(method):
    """(Zero task vectors, dense or rank-0 factors, give zero: the method contract's 'zero'.)"""
    bias, ctx = dense_taus()[:, 0], TensorContext("layer.bias", "fallback")
    torch.testing.assert_close(run(method, bias, ctx, inner="ties"), run("ties", bias, ctx))
    torch.testing.assert_close(run(method, bias, ctx, inner="tsv", inner_params={"alpha": 2.0}), 2 * bias.mean(0))


# --------------------------------------------------------------------------- Core Space


@pytest.mark.parametrize("inner", ["tsv", "ties"])
def test_core_space_matches_numpy_reference(inner):
    stack = lowrank_stack(ranks=(3, 3, 3), m=26, n=34, seed=7)
    got = run("core_space", stack, inner=inner)
    expected = np_core_space(np_factors(stack), inner)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_core_space_is_lossless_and_small():
    stack = lowrank_stack(ranks=(2, 5, 3))
    space = core_space(stack)
    assert space.cores.shape == (3, 10, 10)  # Σ k_t square, whatever m × n
    for M, tau in zip(space.cores, stack.dense()):
        torch.testing.assert_close(space.left @ M @ space.right.mT, tau, rtol=0, atol=1e-12)


def test_core_space_of_adapters_sharing_a_factor_drops_the_null_directions():
    g = torch.Generator().manual_seed(9)
    shared = torch.randn(30, 3, generator=g, dtype=F64)
    stack = TaskStack(torch.zeros(0, 30, 22, dtype=F64), [], {
        t: LowRank(shared, torch.randn(3, 22, generator=g, dtype=F64)) for t in range(3)})
    space = core_space(stack)
    assert space.left.shape == (30, 3) and space.right.shape == (22, 9)
    assert rel(run("core_space", stack, inner="task_arithmetic"), run("task_arithmetic", stack.dense())) <= 1e-13


def test_core_space_of_mixed_adapters_and_full_fine_tunes():
    """A dense τ_t enters by its thin SVD; TA stays exact, TSV equals TSV of the same stack."""
    stack = lowrank_stack(ranks=(2, 3), m=24, n=18)
    mixed = TaskStack(dense_taus(T=1, seed=3), [1], {0: stack.lowrank[0], 2: stack.lowrank[1]})
    assert rel(run("core_space", mixed, inner="task_arithmetic"), run("task_arithmetic", mixed.dense())) <= 1e-13
    assert rel(run("core_space", mixed), run("tsv", mixed.dense())) <= 1e-12


# --------------------------------------------------------------------------- real files


def assert_same_merge(a: dict, b: dict, base: dict, tol: float) -> None:
    for name, value in base.items():
        if value.dtype.is_floating_point:
            scale = (b[name].double() - value.double()).norm().clamp_min(1e-12)
            assert float((a[name].double() - b[name].double()).norm() / scale) <= tol, name


@pytest.mark.parametrize("method,params,tol", [
    ("wudi", {"steps": 40}, 1e-4),  # fewer steps: the defaults run in test_core_engine's end-to-end test
    ("knots", {}, 1e-4),
    ("knots", {"inner": "tsv"}, 1e-4),
    ("core_space", {}, 1e-4),
    ("core_space", {"inner": "prime", "inner_params": {"rank": 2}}, 1e-4),
])
def test_adapters_merge_like_their_materialised_fine_tunes(lora_zoo, method, params, tol):
    """peft adapters (factored path) against peft's merge_and_unload of them (dense path)."""
    adapters = list(lora_zoo["adapters"].values())
    full = list(lora_zoo["full"].values())
    got = primerge.merge(lora_zoo["base"], adapters, method, **params).state_dict
    expected = primerge.merge(lora_zoo["base"], full, method, **params).state_dict
    assert_same_merge(got, expected, state(lora_zoo["base"]), tol)


def test_knots_and_core_space_with_task_arithmetic_equal_task_arithmetic_on_files(lora_zoo):
    adapters = list(lora_zoo["adapters"].values())
    expected = primerge.merge(lora_zoo["base"], adapters, "task_arithmetic").state_dict
    base = state(lora_zoo["base"])
    for method in ("knots", "core_space"):
        got = primerge.merge(lora_zoo["base"], adapters, method, inner="task_arithmetic").state_dict
        assert_same_merge(got, expected, base, 1e-5)


def write_recipe(path, base, models, method, params=None, task_specific=None):
    path.write_text(yaml.safe_dump({"base": str(base), "models": [str(m) for m in models], "method": method,
                                    "parameters": params or {}, "task_specific": task_specific}))
    return path


@pytest.mark.parametrize("method,params", [("wudi", {"steps": 40}), ("knots", {}), ("core_space", {})])
def test_cli_merges_adapters_and_full_fine_tunes(lora_zoo, bert_zoo, tmp_path, method, params):
    from transformers import BertModel

    inputs = {"adapters": (lora_zoo["base"], list(lora_zoo["adapters"].values()), None),
              "full": (bert_zoo["base"], bert_zoo["models"], r"^classifier\.")}
    for kind, (base, models, heads) in inputs.items():
        recipe = write_recipe(tmp_path / f"{kind}.yaml", base, models, method, params, task_specific=heads)
        out = tmp_path / kind
        assert cli.main(["merge", str(recipe), "--out", str(out), "--quiet"]) == 0
        expected = primerge.merge(base, models, method, task_specific=heads, **params).state_dict
        written = load_file(str(out / "model.safetensors"))
        for name, value in written.items():
            assert torch.equal(value, expected[name]), (kind, name)
        model = BertModel.from_pretrained(out)
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 3]])).last_hidden_state).all()
        assert f"`{method}`" in (out / "README.md").read_text()


def test_cli_refuses_an_inner_merge_that_needs_a_model_pass(lora_zoo, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", lora_zoo["base"], lora_zoo["adapters"].values(), "knots",
                          {"inner_params": {"trim_scope": "model"}})
    assert cli.main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "whole-model pass" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_methods_command_lists_the_new_methods(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for header, fields in {"wudi": ("scale", "steps", "lr"), "knots": ("inner", "inner_params", "representation"),
                           "core_space": ("inner", "inner_params")}.items():
        block = out.split(f"\n{header} ")[1].split("\n")[1:1 + len(fields)]
        assert [line.split()[0] for line in block] == list(fields)
