"""The method contract: :func:`check_method` checks that a merging method keeps every promise the
engine relies on, as scikit-learn's ``check_estimator`` does for estimators.

Floor: the public API's (it merges through :func:`primerge.merge` and the engine's treatments).

For a method author
-------------------
Write the method (:mod:`primerge.methods.base`), register it, and run the contract in a test::

    from primerge.methods import merge_method, MethodParams
    from primerge.testing import check_method

    class MyParams(MethodParams):
        scale: float = 1.0

    @merge_method("my_method", MyParams, "what it does", family="elementwise")
    def my_method(taus, ctx, params):
        return params.scale * taus.mean()

    def test_my_method_keeps_the_contract():
        check_method("my_method")                  # the default parameters
        check_method("my_method", {"scale": 0.5})  # and any setting worth its own run

:func:`check_method` raises :class:`AssertionError` naming the method and each property it
breaks, with what was seen. Everything runs on tiny seeded float32 tensors (a 24 × 16 matrix and its
bias; three tasks, or the nearest number the method's ``models`` allows), in well under a second for
most methods. Each tensor's context is the one the stream would give: its seed, θ₀ for a method
registered with ``reads_base``, the inputs' Gram matrices for one with ``reads_grams``; a method with
a whole-model pass (``prepass``) runs it over the check's tensors first.

The properties
--------------
Each check applies where the method's tags (:func:`method_tags`, read from its
:class:`~primerge.methods.base.MethodSpec` and parameters) say it does; unmarked ones apply to all.

``shapes``
    An update of the tensor's shape, finite, on odd shapes (1 × n, n × 1, 1 × 1, a vector, a scalar),
    with one task (where ``models`` allows it) and with duplicated tasks; a ``PerTaskUpdate`` exactly
    when ``rebuild`` is declared, its task tensors (T, *shape).
``zero``
    Zero task vectors (dense, rank-0 or zero-B factors) give an update of exact zeros, so models
    equal to the base give the base bit for bit; a per-task method rebuilds every task as zeros.
``reads_sum`` (functions marked ``reads_sum``)
    The same bits for two stacks with equal sums and for the sum alone, which the stream hands over.
``factored`` (matrix functions that read the stack, not only the sum)
    LoRA factors, mixed with a dense task or all factored, merge like their dense product (relative
    error ≤ 1e-4): the stream hands an adapter's matrices over as factors.
``experts``
    A fused experts tensor [E, m, n] merges exactly as its E matrices stored apart, each with its
    own context and seed, pre-pass included.
``seed``
    Same seed, same bits; the global random state is neither read nor consumed; generators are
    seeded from ``ctx.seed``. Also run with ``svd: randomized`` where the parameters have ``svd``.
``inputs``
    The task vectors handed over (dense rows, factors) are not modified in place.
``pickle``
    What a Ray worker receives and returns (spec, parameters, the pre-pass at every pass, its
    statistics and result, the updates) makes a round trip through Ray's serialiser (cloudpickle;
    the stricter standard pickle without it) and merges to the same bits.
``threads``
    The same bits with 1 and 2 torch threads, under ThreadIndependent as the stream merges.
``svd_requests``
    With ``svd: auto``, the truncated SVDs the matrix function asks for are exactly those its
    ``svd_requests`` declares (none without a declaration): the merge announces each one's choice.
``non_finite`` (methods that need no calibration data)
    A merge through the engine of models whose task vector holds NaN (a matrix) or Inf (a bias) is
    refused where it is read, with primerge's error naming the tensor, whatever the method's read
    path (the sum, the stack, θ₀, the pre-pass). The method must be registered.

A known breach can be set aside with ``skip`` (scikit-learn's ``_xfail_checks``); test that it
still fails with :func:`run_check`, so that the entry goes once the method is fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from primerge.methods.base import MethodParams, MethodSpec, get_method
from primerge.testing.checks import (Tags, check_experts, check_factored, check_inputs_unchanged, check_non_finite,
                                     check_pickling, check_reads_sum, check_seed, check_shapes, check_svd_requests,
                                     check_threads, check_zero, method_tags)
from primerge.util.deterministic import ThreadIndependent


@dataclass(frozen=True)
class Check:
    """One property: the function checking it, whether it applies to a method's tags, and the
    property in a few words (what a failure is reported under)."""

    run: Callable[[MethodSpec, MethodParams], None]
    applies: Callable[[Tags], bool]
    claim: str


def every(tags: Tags) -> bool:
    """Applies to every method."""
    return True


#: The contract, in the order it runs (the table of the module docstring).
CHECKS: dict[str, Check] = {
    "shapes": Check(check_shapes, every, "updates of the tensor's shape, finite, on odd inputs"),
    "zero": Check(check_zero, every, "zero task vectors give a zero update"),
    "reads_sum": Check(check_reads_sum, lambda tags: bool(tags.sum_kinds), "reads_sum: depends on Σ_t τ_t only"),
    "factored": Check(check_factored, lambda tags: tags.factored, "LoRA factors merge like their dense product"),
    "experts": Check(check_experts, every, "an experts tensor merges as its matrices apart"),
    "seed": Check(check_seed, every, "same seed, same bits; randomness from ctx.seed only"),
    "inputs": Check(check_inputs_unchanged, every, "task vectors left unchanged"),
    "pickle": Check(check_pickling, every, "what Ray workers receive survives pickling"),
    "threads": Check(check_threads, every, "the same bits with 1 and 2 threads"),
    "svd_requests": Check(check_svd_requests, every, "svd_requests declares the truncated SVDs asked"),
    "non_finite": Check(check_non_finite, lambda tags: not tags.reads_grams,
                        "NaN or Inf in a task vector is refused with primerge's error"),
}


def resolve(spec: MethodSpec | str, params: MethodParams | dict[str, Any] | None) -> tuple[MethodSpec, MethodParams]:
    """The spec (looked up by name) and its validated parameters (the defaults when ``None``)."""
    spec = get_method(spec) if isinstance(spec, str) else spec
    return spec, params if isinstance(params, MethodParams) else spec.parameters(params)


def applicable_checks(spec: MethodSpec | str, params: MethodParams | dict[str, Any] | None = None) -> list[str]:
    """The names of the checks that apply to the method's tags, in the order they run."""
    spec, params = resolve(spec, params)
    tags = method_tags(spec, params)
    return [name for name, check in CHECKS.items() if check.applies(tags)]


def run_check(name: str, spec: MethodSpec | str, params: MethodParams | dict[str, Any] | None = None) -> None:
    """Run one check (under ThreadIndependent, as the stream merges); :class:`AssertionError`
    naming the method and the property when it fails, or when the method raises instead."""
    spec, params = resolve(spec, params)
    check = CHECKS[name]
    broken = f"method '{spec.name}' breaks '{name}' ({check.claim})"
    try:
        with ThreadIndependent():
            check.run(spec, params)
    except AssertionError as exc:
        raise AssertionError(f"{broken}: {exc}") from exc
    except Exception as exc:  # a method that raises where it should merge breaks the property too
        raise AssertionError(f"{broken}: raised {type(exc).__name__}: {exc}") from exc


def check_method(spec: MethodSpec | str, params: MethodParams | dict[str, Any] | None = None, *,
                 skip: Iterable[str] = ()) -> list[str]:
    """Run every check that applies to the method (see the module docstring), except ``skip``;
    return their names. One :class:`AssertionError` lists every property broken."""
    skip = set(skip)
    unknown = skip - set(CHECKS)
    if unknown:
        raise ValueError(f"no such checks: {sorted(unknown)}; the checks are {list(CHECKS)}")
    names = [name for name in applicable_checks(spec, params) if name not in skip]
    failures = []
    for name in names:
        try:
            run_check(name, spec, params)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("\n".join(failures))
    return names


__all__ = ["CHECKS", "Tags", "applicable_checks", "check_method", "method_tags", "run_check"]
