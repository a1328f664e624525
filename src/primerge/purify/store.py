"""One SVD per matrix for PAVE's rank allocation and purification, cached per model and settings.

For a task's decomposition target X = Y S (Y = W_ft for ``target: weight``, Y = τ for
``target: delta``; S the scaling of :class:`primerge.purify.pave.Scaling`) with X = U Σ Vᵀ:

    SVD_r(X) S⁻¹ = (X − Σ_{k>r} σ_k u_k v_kᵀ) S⁻¹ = Y − Σ_{k>r} σ_k u_k (v_kᵀ S⁻¹)

so the purified task vector at rank r is τ′ = τ − L[:, r−k₀:] R[r−k₀:, :] with
L = U[:, k₀:] diag(Σ[k₀:]) and R = V[:, k₀:]ᵀ S⁻¹ — for the weight target because
W† − W₀ = Y − tail − W₀ = τ − tail·S⁻¹ (PAVE Eq. 6), for the delta target directly. One exact SVD
gives both the spectrum Σ (the allocation, PAVE Algorithm 1) and the tail from k₀ (every rank
r ≥ k₀ the allocation can give). k₀ sits just below the allocation's floor γR, γ ≤ 13/16 (the
floor of ρ = 7/8), so one decomposition serves every ρ of the paper's grid.

A :class:`Decomposition` set of one model is cached in memory (least recently used, within a byte
budget) and on disk under ``<cache>/pave/<key>.safetensors``; the key hashes the model's
covariance key (its files, tokenizer, texts and sampling settings), the settings and, for the
delta target, the base weights. Computation is in float64.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from primerge.util.deterministic import ThreadIndependent
from primerge.linalg import svd

FORMAT = 1
#: The deepest allocation floor kept for any ρ ≥ 7/8: γ(7/8) = 7/8 − 1/16.
TAIL_FLOOR = 13 / 16
MEMORY_BYTES = 1 << 30


@dataclass
class Decomposition:
    """Σ of X = Y S and its tail from index ``start``, back-projected by S⁻¹ (module docstring)."""

    S: Tensor  # (R,) descending
    start: int
    left: Tensor  # (m, R − start): U diag(Σ) from start
    right: Tensor  # (R − start, n): Vᵀ S⁻¹ from start

    def purified(self, tau: Tensor, rank: int) -> Tensor | None:
        """τ − Σ_{k ≥ rank} σ_k u_k (v_kᵀ S⁻¹) in float64; None when ``rank`` < ``start``."""
        if rank < self.start:
            return None
        k = rank - self.start
        return tau.double() - self.left[:, k:] @ self.right[k:, :]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.S, self.left, self.right))


def tail_start(R: int, floor: float) -> int:
    """k₀: two below ⌊γR⌋ for γ = min(floor, 13/16), at least 0."""
    return max(0, math.floor(min(floor, TAIL_FLOOR) * R) - 2)


def decompose(targets: Tensor, inverses, start: int) -> list[Decomposition]:
    """Decompositions of a batch of targets X_t (T, m, n), one exact SVD each (thread-independent,
    spread over the threads); ``inverses[t]`` maps Y ↦ Y S_t⁻¹."""
    out = []
    with ThreadIndependent():
        full = svd(targets)
        for t, inverse in enumerate(inverses):
            U, S, V = full.U[t], full.S[t], full.V[t]
            left = (U[:, start:] * S[start:]).contiguous()
            out.append(Decomposition(S.clone(), start, left, inverse(V[:, start:].mT).contiguous()))
    return out


def _save(path: Path, decompositions: dict[str, Decomposition]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, d in decompositions.items():
        tensors.update({f"{name}|S": d.S, f"{name}|L": d.left, f"{name}|R": d.right})
    fd, tmp = tempfile.mkstemp(prefix=".pave-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": str(FORMAT)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: Path) -> dict[str, Decomposition] | None:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError):
        return None  # a damaged cache entry is recomputed
    out = {}
    for key, S in tensors.items():
        if key.endswith("|S"):
            name = key[:-2]
            left, right = tensors[f"{name}|L"], tensors[f"{name}|R"]
            out[name] = Decomposition(S, S.shape[0] - left.shape[1], left, right)
    return out


def store_key(*parts: str) -> str:
    """SHA-256 (32 hex digits) of the settings and content keys that a decomposition depends on."""
    return hashlib.sha256("\x00".join((f"pave-svd/{FORMAT}/{TAIL_FLOOR}", *parts)).encode()).hexdigest()[:32]


class DecompositionStore:
    """Decomposition sets by key: in memory (LRU within ``max_bytes``), then on disk under
    ``folder``, else computed by the caller and :meth:`put`."""

    def __init__(self, max_bytes: int = MEMORY_BYTES):
        self.max_bytes = max_bytes
        self._memory: OrderedDict[tuple[Path, str], dict[str, Decomposition]] = OrderedDict()

    def get(self, folder: Path, key: str) -> dict[str, Decomposition] | None:
        found = self._memory.get((folder, key))
        if found is None:
            path = folder / f"{key}.safetensors"
            found = _load(path) if path.is_file() else None
            if found is not None:
                self._remember((folder, key), found)
        else:
            self._memory.move_to_end((folder, key))
        return found

    def put(self, folder: Path, key: str, decompositions: dict[str, Decomposition]) -> None:
        _save(folder / f"{key}.safetensors", decompositions)
        self._remember((folder, key), decompositions)

    def _remember(self, key: tuple[Path, str], decompositions: dict[str, Decomposition]) -> None:
        self._memory[key] = decompositions
        total = sum(d.nbytes for entry in self._memory.values() for d in entry.values())
        while total > self.max_bytes and len(self._memory) > 1:
            _, dropped = self._memory.popitem(last=False)
            total -= sum(d.nbytes for d in dropped.values())


#: The process-wide store (tuning merges many times with the same purified models).
STORE = DecompositionStore()
