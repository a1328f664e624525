"""The method contract (:mod:`primerge.testing`): every registered method keeps it, and it catches
methods, and engine paths, that break it.

The methods are read from the registry when the tests are collected, so a method added anywhere
in ``primerge.methods`` is checked without being listed here. Methods that break the contract on
purpose are registered into a copy of the registry for one test only.
"""

from __future__ import annotations

import threading

import pytest
import torch

import primerge
from primerge.core import sources, treatments
from primerge.linalg import truncated_svd
from primerge.methods import base
from primerge.methods.base import MethodParams, merge_method, reads_sum
from primerge.testing import CHECKS, check_method, run_check

#: Contract breaches known in registered methods: method -> {check: why}. Each is skipped in the
#: contract run and must still fail (test_known_breaches_still_fail), so the entry goes once fixed.
KNOWN_BREACHES = {
    "core_space": {"svd_requests": "the inner TSV/PRIME asks truncated SVDs in the core space, and core_space "
                                   "declares none, so `svd: auto`'s choice there is not announced"},
    "multislerp": {"zero": "zero task vectors have no direction: the mean of the unit vectors vanishes and more "
                           "than two models are refused, where models equal to the base should give the base"},
    "karcher": {"zero": "the iterated mean of zero task vectors leaves rounding (‖update‖ ~ 1e-6), so models "
                        "equal to the base do not give the base bit for bit"},
}


@pytest.mark.parametrize("method", [spec.name for spec in primerge.list_methods()])
def test_every_registered_method_keeps_the_contract(method):
    ran = check_method(method, skip=KNOWN_BREACHES.get(method, {}))
    assert {"shapes", "seed", "inputs", "pickle", "threads"} <= set(ran)


@pytest.mark.parametrize("method,check", [(m, c) for m, checks in KNOWN_BREACHES.items() for c in checks])
def test_known_breaches_still_fail(method, check):
    with pytest.raises(AssertionError, match=f"method '{method}' breaks '{check}'"):
        run_check(check, method)


# --------------------------------------------------------------------------- a method author's flow


class HalfParams(MethodParams):
    scale: float = 0.5


@reads_sum
def half_sum(taus, ctx, params):
    """scale · Σ_t τ_t: a sound method (it reads only the sum, and says so)."""
    return params.scale * taus.sum()


@pytest.fixture
def registry(monkeypatch):
    """Registrations of this test go into a copy of the registry, dropped after it."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    return lambda name, fn, **kw: merge_method(name, HalfParams, "a test method", family="elementwise", **kw)(fn)


def test_a_sound_third_party_method_passes_with_the_checks_its_tags_ask(registry):
    registry("half_sum", half_sum)
    assert check_method("half_sum") == [n for n in CHECKS if n != "factored"]  # it reads the sum, never factors
    assert check_method("half_sum", {"scale": -2.0})


def test_unknown_check_names_are_refused():
    with pytest.raises(ValueError, match="no such checks: \\['zeros'\\]"):
        check_method("task_arithmetic", skip=["zeros"])


# --------------------------------------------------------------------------- broken methods are caught


@reads_sum
def rows_marked_as_sum(taus, ctx, params):
    """Declares reads_sum but reads the dense rows: on Σ_t τ_t alone there are none."""
    return params.scale * taus.dense_rows.sum(0)


def normalised_mean(taus, ctx, params):
    """Divides by the norm without guarding zero: zero task vectors give NaN."""
    mean = taus.dense().mean(0)
    return params.scale * mean / mean.norm()


def global_rng_drop(taus, ctx, params):
    """DARE-like drop drawn from torch's global generator instead of ctx.seed."""
    return (taus.dense() * (torch.rand(taus.shape) >= params.scale)).sum(0)


def constant_seed_drop(taus, ctx, params):
    """DARE-like drop from a generator seeded with a constant: every tensor gets the same mask."""
    g = torch.Generator().manual_seed(0)
    return (taus.dense() * (torch.rand(taus.shape, generator=g) >= params.scale)).sum(0)


def in_place_scale(taus, ctx, params):
    """Scales the stack's own block in place (dense() of a dense stack is not a copy)."""
    return taus.dense().mul_(params.scale).sum(0)


def dense_rows_only(taus, ctx, params):
    """Forgets LoRA tasks: reads the dense rows, not the factored ones."""
    return params.scale * taus.dense_rows.sum(0)


def threads_dependent(taus, ctx, params):
    return taus.sum() * torch.get_num_threads()


class SelfAccumulating:
    """A pre-pass that sums into itself in observe() instead of returning the statistic: right in
    one process, wrong on Ray, where observe() runs on a copy."""

    passes = 1

    def __init__(self):
        self.total = 0.0

    def observe(self, pass_index, taus, ctx):
        self.total += float(taus.dense().abs().sum())

    def combine(self, first, second):
        return None

    def end_pass(self, pass_index, total):
        pass

    def result(self):
        return self.total


def self_accumulating(params):
    return SelfAccumulating()


def scaled_by_prepass(taus, ctx, params):
    return taus.dense().mean(0) / (1.0 + ctx.prepass)


def undeclared_truncated_svd(taus, ctx, params):
    """A rank-2 truncation of the mean through ``svd: auto`` with no svd_requests declared."""
    return truncated_svd(taus.dense().mean(0), 2).reconstruct() if ctx.kind == "matrix" else taus.dense().mean(0)


@pytest.mark.parametrize("fn,kw,breaks", [
    (rows_marked_as_sum, {}, "reads_sum"),
    (normalised_mean, {}, "zero"),
    (global_rng_drop, {}, "seed"),
    (constant_seed_drop, {}, "seed"),
    (in_place_scale, {}, "inputs"),
    (dense_rows_only, {}, "factored"),
    (threads_dependent, {}, "threads"),
    (scaled_by_prepass, {"prepass": self_accumulating}, "pickle"),
    (undeclared_truncated_svd, {}, "svd_requests"),
], ids=lambda v: v.__name__ if callable(v) else None)
def test_the_contract_catches_a_broken_method(registry, fn, kw, breaks):
    registry("broken", fn, **kw)
    with pytest.raises(AssertionError, match=f"method 'broken' breaks '{breaks}'"):
        check_method("broken")


def test_the_constant_seed_is_named(registry):
    registry("broken", constant_seed_drop)
    with pytest.raises(AssertionError, match="seeds its generators with constants, not from ctx.seed"):
        run_check("seed", "broken")


class Locked(SelfAccumulating):
    """A pre-pass holding a lock: it cannot travel to a worker."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def locked(params):
    return Locked()


def test_a_pre_pass_that_cannot_travel_is_named(registry):
    registry("broken", scaled_by_prepass, prepass=locked)
    with pytest.raises(AssertionError, match="breaks 'pickle'.*does not pickle.*lock"):
        run_check("pickle", "broken")


# --------------------------------------------------------------------------- broken engine paths are caught


def test_experts_split_out_of_order_is_caught(monkeypatch):
    """The experts check compares the engine's per-matrix wrapper with the matrices merged apart."""
    real = treatments.split
    monkeypatch.setattr(treatments, "split", lambda taus, view: real(taus, view)[::-1])
    with pytest.raises(AssertionError, match="breaks 'experts'"):
        run_check("experts", "ties")


def test_a_reader_that_lets_nan_through_is_caught(monkeypatch):
    """Without the readers' refusal a NaN reaches DARE, whose drop may hide it: the check sees a merge
    without primerge's error naming the tensor."""
    monkeypatch.setattr(sources, "non_finite", lambda tensor: False)
    with pytest.raises(AssertionError, match="breaks 'non_finite'"):
        run_check("non_finite", "dare")
