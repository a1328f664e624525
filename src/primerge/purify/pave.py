"""PAVE: purified task vectors in a knowledge-aware subspace (pave.txt Sections 3.2–3.3, Appendix A).

For a linear weight W_ft = W₀ + τ (PyTorch layout (out, in)) with input covariance C = XᵀX/rows:

- **CO-SVD** (Eqs. 5–6): W† = SVD_r(W_ft C) C⁻¹ and the purified task vector is W† − W₀.
- **SVD-LLM**: C = L Lᵀ (Cholesky); W† = SVD_r(W_ft L) L⁻¹ (a triangular solve).
- **ASVD**: D = diag(mean |x| per input feature); W† = SVD_r(W_ft D) D⁻¹.
- **SVD**: W† = SVD_r(W_ft), no data.

``target: delta`` (not in the paper) truncates the task vector instead of the fine-tuned weight:
τ′ = SVD_r(τ S) S⁻¹. Why it exists: Eq. 6 truncates W_ft = W₀ + τ, so τ′ − τ = −tail_r(W_ft S) S⁻¹
carries the pretrained weight's own pruned tail, nearly the same for every task and several times
‖τ‖ in the FFN matrices (docs/benchmarks.md, "PAVE purification"); truncating τ S removes only
what the task vector itself has outside its top-r activated directions.

``tasks`` purifies a subset of the models (the authors choose it per benchmark); the others keep
their plain task vectors and stay out of the allocation. Every matrix costs one exact SVD per
purified model, shared by the allocation and the purification and cached per model and settings
(:mod:`primerge.purify.store`); a uniform allocation at a rank small enough for the randomized SVD
skips it.

C is regularised as C + ε·mean(diag C)·I with ε doubling from 0.01 until ‖C_reg C_reg⁻¹ − I‖_F
< 0.05 (the check uses a Cholesky solve; the hot path never forms C⁻¹: Y C⁻¹ is the Cholesky
solve of C Xᵀ = Yᵀ). [decision] ASVD's diagonal gets the same floor, mean|x| + 0.01·mean(mean|x|),
so no feature is divided by ~0. Computation is in float64; the task vector is returned in float32.

**Spectral rank allocation** (Algorithm 1, Eqs. 7–9): per layer l with full rank R (= min(m, n)),
normalise each task's singular values of its decomposition target by the largest,
s_{t,j} = σ_{t,j}/σ_{t,1}; start every r_t at R; while Σ_t r_t/(T·R) > ρ, decrement the task (among
those still above the floor) whose current tail s_{t,r_t} is smallest, and drop it from the
candidates once r_t ≤ γR, γ = ρ − (1 − ρ)/2. Task t's ratio ρ_t = Σ_l r_t^l / Σ_l R^l is then
applied to all its layers: r = max(1, round(ρ_t R)). ``uniform`` keeps round(ρR) everywhere.
[decision] A layer enters task t's allocation only if t's hook fired there; layers whose hook
never fired keep the plain task vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from primerge.core.plan import Plan, build_plan
from primerge.util.errors import InputError
from primerge.linalg import SVDMode, choose_svd, truncated_svd
from primerge.core.calibration_block import task_texts
from primerge.core.purify_block import PurifyConfig, Target
from primerge.util.cache_dirs import cache_root
from primerge.util.hashing import content_digest
from primerge.purify.covariance import Covariances, model_covariances
from primerge.purify.store import STORE, TAIL_FLOOR, Decomposition, decompose, store_key, tail_start
from primerge.core.recipe import Recipe
from primerge.util.seeding import derive_seed

EPS_START = 0.01
INVERSE_TOL = 0.05
MAX_DOUBLINGS = 40


def shifted(cov: Tensor, eps: float) -> Tensor:
    """C + ε·mean(diag C)·I in float64 (the scale is 1 when the diagonal mean is not positive)."""
    C = cov.double()
    scale = float(C.diagonal().mean())
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    return C + (eps * scale) * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


def regularize(cov: Tensor, eps: float = EPS_START, tol: float = INVERSE_TOL) -> tuple[Tensor, Tensor, float]:
    """C_reg = C + ε·mean(diag C)·I with the smallest ε = 0.01·2^k such that C_reg is
    Cholesky-factorable and ‖C_reg C_reg⁻¹ − I‖_F < tol (C_reg⁻¹ applied by Cholesky solve).

    Returns (C_reg, L with C_reg = L Lᵀ, ε). Raises ValueError when no ε works.
    """
    for _ in range(MAX_DOUBLINGS):
        C_reg = shifted(cov, eps)
        L, info = torch.linalg.cholesky_ex(C_reg)
        if int(info) == 0:
            eye = torch.eye(C_reg.shape[0], dtype=C_reg.dtype, device=C_reg.device)
            residual = C_reg @ torch.cholesky_solve(eye, L) - eye
            if float(torch.linalg.matrix_norm(residual)) < tol:
                return C_reg, L, eps
        eps *= 2
    raise ValueError("the covariance could not be regularised to an invertible matrix")


def regularized_with(cov: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """C_reg for a known ε and its Cholesky factor (see :func:`regularize`)."""
    C_reg = shifted(cov, eps)
    return C_reg, torch.linalg.cholesky(C_reg)


@dataclass
class Scaling:
    """The right factor S of a decomposition target W S and the map Y ↦ Y S⁻¹ back.

    ``kind``: ``co_svd`` (S = C_reg), ``svd_llm`` (S = L, C_reg = L Lᵀ), ``asvd`` (S = diag d),
    ``svd`` (S = I).
    """

    kind: str
    C: Tensor | None = None
    L: Tensor | None = None
    d: Tensor | None = None

    def forward(self, W: Tensor) -> Tensor:
        if self.kind == "co_svd":
            return W @ self.C
        if self.kind == "svd_llm":
            return W @ self.L
        if self.kind == "asvd":
            return W * self.d
        return W

    def inverse(self, Y: Tensor) -> Tensor:
        if self.kind == "co_svd":  # Y C⁻¹ = (C⁻¹ Yᵀ)ᵀ, C symmetric: a Cholesky solve
            return torch.cholesky_solve(Y.mT, self.L).mT
        if self.kind == "svd_llm":  # Y L⁻¹: solve X L = Y, i.e. Lᵀ Xᵀ = Yᵀ
            return torch.linalg.solve_triangular(self.L.mT, Y.mT, upper=True).mT
        if self.kind == "asvd":
            return Y / self.d
        return Y


def make_scaling(kind: str, cov: Tensor | None = None, abs_mean: Tensor | None = None,
                 eps: float | None = None) -> Scaling:
    """The :class:`Scaling` of a decomposition from a covariance (and mean |x| for ASVD)."""
    if kind == "svd":
        return Scaling("svd")
    if kind == "asvd":
        d = abs_mean.double()
        return Scaling("asvd", d=d + EPS_START * (float(d.mean()) or 1.0))
    C, L = regularized_with(cov, eps) if eps is not None else regularize(cov)[:2]
    return Scaling(kind, C=C, L=L)


def purify_matrix(W: Tensor, scaling: Scaling, rank: int, seed: int = 0, mode: SVDMode = "exact") -> Tensor:
    """W† = SVD_r(W S) S⁻¹ (PAVE Eq. 5) in float64; ``rank`` ≥ min(m, n) keeps every component.
    ``mode`` as in :func:`primerge.linalg.truncated_svd` (``auto``: randomized for a small rank)."""
    target = scaling.forward(W.double())
    rank = min(rank, min(target.shape))
    low = truncated_svd(target, rank, mode=mode, seed=seed).reconstruct()
    return scaling.inverse(low)


def purified_task_vector(base: Tensor, tau: Tensor, scaling: Scaling, rank: int, target: Target = "weight",
                         mode: SVDMode = "exact", seed: int = 0) -> Tensor:
    """The purified task vector in float32:

    - ``weight`` (PAVE Eq. 6): ΔW_PAVE = SVD_r((W₀ + τ) S) S⁻¹ − W₀;
    - ``delta``: SVD_r(τ S) S⁻¹, the same covariance-weighted truncation of the task vector itself.
    """
    if target == "delta":
        return purify_matrix(tau, scaling, rank, seed, mode).to(torch.float32)
    W0 = base.double()
    return (purify_matrix(W0 + tau.double(), scaling, rank, seed, mode) - W0).to(torch.float32)


def spectral_allocation(spectra: Sequence[Tensor], rho: float, floor: float) -> list[list[int]]:
    """PAVE Algorithm 1 per layer: ranks r_t^l for every layer (list over layers of T ints).

    ``spectra``: one (T, R_l) tensor of descending singular values per layer.
    """
    out = []
    for values in spectra:
        T, R = values.shape
        top = values[:, :1].double()
        s = values.double() / torch.where(top > 0, top, 1.0)
        r = [R] * T
        active = [t for t in range(T) if R > 1 and r[t] > floor * R]
        while active and sum(r) / (T * R) > rho:
            t = min(active, key=lambda i: (float(s[i, r[i] - 1]), i))
            r[t] -= 1
            if r[t] <= floor * R or r[t] <= 1:
                active.remove(t)
        out.append(r)
    return out


def match_modules(tensor_names: Sequence[str], modules: Sequence[str]) -> dict[str, str]:
    """Map checkpoint tensor names ``<module>.weight`` to hooked module names.

    Exact match first; else the unique module whose name is a dotted suffix of the tensor's
    module path or has it as a dotted suffix (a wrapper prefix such as ``bert.`` on either side).
    """
    mods = set(modules)
    out: dict[str, str] = {}
    for name in tensor_names:
        if not name.endswith(".weight"):
            continue
        path = name[: -len(".weight")]
        if path in mods:
            out[name] = path
            continue
        hits = [m for m in modules if path.endswith("." + m) or m.endswith("." + path)]
        if len(hits) == 1:
            out[name] = hits[0]
    return out


@dataclass
class Purifier:
    """The engine's task-vector transform: (label, tensor name, θ₀, τ) -> purified τ.

    ``ranks[(label, name)]`` is the preserved rank; tensors without one pass unchanged. A tensor
    with a :class:`primerge.purify.store.Decomposition` is purified from it (one low-rank
    product); the others (uniform allocation at a small rank) by a randomized truncated SVD.
    """

    config: PurifyConfig
    ranks: dict[tuple[str, str], int]
    covariances: dict[str, Covariances] = field(default_factory=dict)
    modules: dict[tuple[str, str], str] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    decompositions: dict[str, dict[str, Decomposition]] = field(default_factory=dict)
    seed: int = 0
    _eps: dict[tuple[str, str], float] = field(default_factory=dict)

    def scaling(self, label: str, name: str) -> Scaling:
        kind = self.config.method
        if kind == "svd":
            return Scaling("svd")
        module = self.modules[(label, name)]
        cov = self.covariances[label]
        if kind == "asvd":
            return make_scaling("asvd", abs_mean=cov.abs_mean[module])
        key = (label, module)
        if key not in self._eps:
            self._eps[key] = regularize(cov.cov[module])[2]
        return make_scaling(kind, cov.cov[module], eps=self._eps[key])

    def __call__(self, label: str, name: str, base: Tensor, tau: Tensor) -> Tensor:
        rank = self.ranks.get((label, name))
        if rank is None:
            return tau
        found = self.decompositions.get(label, {}).get(name)
        out = found.purified(tau, rank) if found is not None else None
        if out is None:
            out = purified_task_vector(base, tau, self.scaling(label, name), rank, self.config.target,
                                       mode="auto", seed=derive_seed(self.seed, f"{label}/{name}"))
        return out.to(dtype=torch.float32, device=tau.device)

    def summary(self) -> str:
        ratios = ", ".join(f"{k} {v:.4f}" for k, v in self.ratios.items())
        return (f"PAVE ({self.config.method}, {self.config.target}, ρ = {self.config.rank_ratio:g}, "
                f"{self.config.allocation}): {len(self.ranks)} task matrices purified; rank ratios: {ratios}")


def build_purifier(recipe: Recipe, *, cache: Path | None = None, quiet: bool = True) -> Purifier:
    """Validate ``recipe.purify``, collect covariances (cached), decompose (cached) and allocate
    ranks for the models it purifies; return the transform."""
    config = recipe.purify_config
    base_folder = Path(recipe.base) if Path(recipe.base).is_dir() else None
    paths = dict(zip(recipe.model_labels(), (Path(m.path) for m in recipe.models)))
    covariances: dict[str, Covariances] = {}
    if config.needs_data:
        for label in config.tasks:
            try:
                texts = task_texts(config.data[label])
            except InputError as exc:
                raise InputError(f"purify.data.{label}: {exc}") from None
            covariances[label] = model_covariances(
                paths[label], texts, base=base_folder, samples=config.samples,
                max_length=config.max_length, batch_size=config.batch_size, cache=cache)
    unweighted = recipe.replace(models=[{**m.model_dump(exclude_none=True), "weight": 1.0} for m in recipe.models])
    plan = build_plan(unweighted)
    try:
        purifier = _prepare(plan, config, recipe, covariances)
        purifier.seed = recipe.seed
        _decompose_missing(plan, purifier, recipe, paths, cache or cache_root(), quiet)
        _allocate(plan, purifier)
        return purifier
    finally:
        plan.close()


def _prepare(plan: Plan, config: PurifyConfig, recipe: Recipe, covariances: dict[str, Covariances]) -> Purifier:
    """The purifier with each purified model's matched modules (every matrix for plain SVD)."""
    names = [e.name for e in plan.entries if e.kind == "matrix"]
    modules: dict[tuple[str, str], str] = {}
    for label in config.tasks:
        if config.needs_data:
            for name, module in match_modules(names, covariances[label].modules()).items():
                modules[(label, name)] = module
        else:
            modules.update({(label, name): "" for name in names})
    return Purifier(config, {}, covariances, modules)


def _uniform_rank(config: PurifyConfig, shape: tuple[int, ...]) -> int:
    return max(1, round(config.rank_ratio * min(shape)))


def _needs_decomposition(config: PurifyConfig, shape: tuple[int, ...]) -> bool:
    """Spectral allocation needs every spectrum; a uniform rank small enough for the randomized
    SVD (:func:`primerge.linalg.choose_svd`) needs none."""
    return config.allocation == "spectral" or choose_svd(shape, _uniform_rank(config, shape)).mode == "exact"


def _store_key(purifier: Purifier, label: str, path: Path, recipe: Recipe) -> str:
    config = purifier.config
    model = purifier.covariances[label].key if config.needs_data else content_digest(path)
    base = content_digest(Path(recipe.base)) if config.target == "delta" else ""
    return store_key(model, base, config.method, config.target, f"{min(config.floor, TAIL_FLOOR)}",
                     f"{EPS_START}/{INVERSE_TOL}", f"{config.max_length}")


def _decompose_missing(plan: Plan, purifier: Purifier, recipe: Recipe, paths: dict[str, Path], cache: Path,
                       quiet: bool) -> None:
    """Each purified model's decompositions from the store, or computed (one batched exact SVD per
    matrix over the models that miss it) and stored."""
    config = purifier.config
    folder = Path(cache) / "pave"
    matrices = [e for e in plan.entries if e.kind == "matrix" and _needs_decomposition(config, e.shape)]
    keys = {label: _store_key(purifier, label, paths[label], recipe) for label in config.tasks}
    missing = []
    for label in config.tasks:
        wanted = {e.name for e in matrices if (label, e.name) in purifier.modules}
        found = STORE.get(folder, keys[label])
        if found is not None and wanted <= set(found):
            purifier.decompositions[label] = found
        else:
            purifier.decompositions[label] = {}
            missing.append(label)
    if not missing:
        return
    labels = plan.labels
    for entry in tqdm(matrices, desc="PAVE decompositions", unit="tensor", disable=quiet, leave=False):
        todo = [label for label in missing if (label, entry.name) in purifier.modules]
        if not todo:
            continue
        base, stack = plan.task_vectors(entry, torch.device("cpu"))
        taus = stack.dense()
        targets, inverses = [], []
        for label in todo:
            tau = taus[labels.index(label)].double()
            scaling = purifier.scaling(label, entry.name)
            targets.append(scaling.forward(tau if config.target == "delta" else base.double() + tau))
            inverses.append(scaling.inverse)
        start = tail_start(min(entry.shape), config.floor)
        for label, found in zip(todo, decompose(torch.stack(targets), inverses, start)):
            purifier.decompositions[label][entry.name] = found
    for label in missing:
        STORE.put(folder, keys[label], purifier.decompositions[label])


def _allocate(plan: Plan, purifier: Purifier) -> None:
    """Every purified model's rank ratio ρ_t (spectral: PAVE Algorithm 1 over the purified models;
    uniform: ρ) and its ranks r = round(ρ_t R) on every matched matrix."""
    config = purifier.config
    matrices = [e for e in plan.entries if e.kind == "matrix"]
    kept = {t: 0 for t in config.tasks}
    full = {t: 0 for t in config.tasks}
    for entry in matrices:
        tasks = [t for t in config.tasks if (t, entry.name) in purifier.modules]
        if not tasks:
            continue
        R = min(entry.shape)
        if config.allocation == "uniform":
            ranks = [_uniform_rank(config, entry.shape)] * len(tasks)
        else:
            spectra = torch.stack([purifier.decompositions[t][entry.name].S for t in tasks])
            (ranks,) = spectral_allocation([spectra], config.rank_ratio, config.floor)
        for t, r in zip(tasks, ranks):
            kept[t] += r
            full[t] += R
    for label in config.tasks:
        if not full[label]:
            continue
        ratio = kept[label] / full[label]
        purifier.ratios[label] = ratio
        for entry in matrices:
            if (label, entry.name) in purifier.modules:
                R = min(entry.shape)
                purifier.ranks[(label, entry.name)] = max(1, min(R, round(ratio * R)))
