"""PAVE purification: identities, regularisation, spectral rank allocation, config errors, end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

import primerge
from primerge.util.errors import InputError, RecipeError
from primerge.purify import parse_purify, spectral_allocation
from primerge.purify.pave import make_scaling, match_modules, purified_task_vector, purify_matrix, regularize
from primerge.core.recipe import build_recipe

F64 = torch.float64


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g, dtype=F64)
    return X.T @ X / (4 * n)


@pytest.mark.parametrize("kind", ["co_svd", "svd_llm", "asvd", "svd"])
def test_full_rank_gives_back_the_plain_task_vector(kind):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g, dtype=F64)
    tau = 1e-2 * torch.randn(7, 5, generator=g, dtype=F64)
    C = spd(5, 1)
    scaling = make_scaling(kind, C, C.diagonal().sqrt())
    out = purified_task_vector(base, tau, scaling, rank=5)
    assert torch.allclose(out.double(), tau, atol=1e-6)
    low = purified_task_vector(base, tau, scaling, rank=2)
    assert not torch.allclose(low.double(), tau, atol=1e-4)


def test_co_svd_truncates_in_the_activated_space():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(6, 5, generator=g, dtype=F64)
    C = spd(5, 5)
    scaling = make_scaling("co_svd", C)
    W_dag = purify_matrix(W, scaling, rank=2)
    target = W @ scaling.C
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    assert torch.allclose(W_dag @ scaling.C, (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-10)


def test_regularize_singular_covariance():
    x = torch.randn(3, 6, dtype=F64)
    C = x.T @ x  # rank 3 of 6
    C_reg, L, eps = regularize(C)
    assert eps >= 0.01
    eye = torch.eye(6, dtype=F64)
    assert torch.linalg.matrix_norm(C_reg @ torch.cholesky_solve(eye, L) - eye) < 0.05
    assert torch.allclose(L @ L.T, C_reg, atol=1e-10)


def test_spectral_allocation_hand_cases():
    # two tasks, R = 4, ρ = 0.75: remove task 0's tail 0.1, then task 1's 0.3
    s = torch.tensor([[1.0, 0.9, 0.8, 0.1], [1.0, 0.5, 0.4, 0.3]])
    assert spectral_allocation([s], 0.75, 0.75 - 0.125) == [[3, 3]]
    # ρ = 0.5, γ = 0.25: task 0 goes down to its floor (γR = 1), then task 1 pays the rest
    s = torch.tensor([[1.0, 0.01, 0.01, 0.01], [2.0, 1.8, 1.8, 1.8]])
    assert spectral_allocation([s], 0.5, 0.25) == [[1, 3]]


def test_spectral_allocation_respects_rho_and_floor():
    g = torch.Generator().manual_seed(6)
    for rho in (7 / 8, 15 / 16, 31 / 32):
        floor = rho - (1 - rho) / 2
        spectra = [torch.rand(5, R, generator=g).sort(descending=True).values ** (1 + 4 * torch.rand(5, 1, generator=g))
                   for R in (16, 40, 64)]
        for values, ranks in zip(spectra, spectral_allocation(spectra, rho, floor)):
            T, R = values.shape
            assert sum(ranks) / (T * R) <= rho
            assert all(r > floor * R - 1 and r <= R for r in ranks)


def test_match_modules_handles_wrapper_prefixes():
    names = ["encoder.layer.0.attention.self.query.weight", "pooler.dense.weight", "embeddings.word_embeddings.weight"]
    mods = ["bert.encoder.layer.0.attention.self.query", "bert.pooler.dense"]
    assert match_modules(names, mods) == {names[0]: mods[0], names[1]: mods[1]}


def _recipe(bert_zoo, purify):
    return build_recipe({"base": bert_zoo["base"], "models": [str(p) for p in bert_zoo["models"]],
                         "method": "task_arithmetic", "task_specific": r"^classifier\.", "purify": purify})


def test_config_errors_name_the_field(bert_zoo, tmp_path):
    with pytest.raises(RecipeError, match="unknown field 'purify.rank_ration'.*rank_ratio"):
        parse_purify(_recipe(bert_zoo, {"method": "svd", "rank_ration": 0.9}))
    with pytest.raises(RecipeError, match="purify.method"):
        parse_purify(_recipe(bert_zoo, {"method": "qr"}))
    with pytest.raises(RecipeError, match="purify.rank_ratio"):
        parse_purify(_recipe(bert_zoo, {"method": "svd", "rank_ratio": 1.5}))
    with pytest.raises(RecipeError, match="purify.data: no data for model 'task0'"):
        parse_purify(_recipe(bert_zoo, {"method": "co_svd"}))
    with pytest.raises(RecipeError, match="purify.data: 'task9' is not a model"):
        parse_purify(_recipe(bert_zoo, {"method": "svd", "data": {"task9": "x.csv"}}))
    missing = tmp_path / "missing.csv"
    data = {f"task{i}": str(missing) for i in range(3)}
    with pytest.raises(InputError, match="purify.data.task0:.*missing.csv"):
        primerge.merge(bert_zoo["base"], [str(p) for p in bert_zoo["models"]], "task_arithmetic",
                       task_specific=r"^classifier\.", purify={"method": "co_svd", "data": data})


WORDS = ["red", "green", "blue", "cat", "dog", "bird", "big", "small", "the", "a"]


@pytest.fixture(scope="module")
def pave_zoo(bert_zoo, tmp_path_factory):
    """Copies of the bert_zoo with a BertTokenizer (vocab of 64) in the base folder, plus task data."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("pave_zoo")
    base = root / "base"
    shutil.copytree(bert_zoo["base"], base)
    (base / "tokenizer_config.json").unlink()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"w{i}" for i in range(64 - len(vocab))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(base)
    models = []
    for p in bert_zoo["models"]:
        shutil.copytree(p, root / p.name)
        models.append(root / p.name)
    g = torch.Generator().manual_seed(0)
    rows = ["text,label"]
    for i in range(60):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6,), generator=g)]
        rows.append(f"{' '.join(words)},{i % 2}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return {"root": root, "base": base, "models": models, "data": root / "data.csv"}


def test_pave_end_to_end_merge_and_cache(pave_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = {"base": "base", "models": [m.name for m in pave_zoo["models"]], "method": "task_arithmetic",
              "task_specific": r"^classifier\.",
              "purify": {"method": "co_svd", "rank_ratio": 0.75, "samples": 200,
                         "data": {m.name: "data.csv" for m in pave_zoo["models"]}}}
    path = pave_zoo["root"] / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    purified = primerge.merge_recipe(path)
    files = list((tmp_path / "cache" / "covariances").glob("*.safetensors"))
    assert len(files) == 3  # one per model, reused below
    mtimes = [f.stat().st_mtime_ns for f in files]
    recipe["purify"]["rank_ratio"] = 1.0
    path.write_text(yaml.safe_dump(recipe))
    full = primerge.merge_recipe(path)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    del recipe["purify"]
    path.write_text(yaml.safe_dump(recipe))
    plain = primerge.merge_recipe(path)
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(full.state_dict[name], plain.state_dict[name], atol=1e-5)
    assert not torch.allclose(purified.state_dict[name], plain.state_dict[name], atol=1e-4)
    bias = "encoder.layer.0.attention.self.query.bias"  # not a matrix: untouched by PAVE
    assert torch.equal(purified.state_dict[bias], plain.state_dict[bias])
    # the transform: task ratios near ρ, and W† S of rank r exactly (S = C_reg)
    from primerge.purify import build_purifier

    recipe["purify"] = {"method": "co_svd", "rank_ratio": 0.75, "samples": 200,
                        "data": {m.name: "data.csv" for m in pave_zoo["models"]}}
    purifier = build_purifier(build_recipe(recipe, relative_to=pave_zoo["root"]))
    assert set(purifier.ratios) == {"task0", "task1", "task2"}
    ratios = list(purifier.ratios.values())
    assert all(0.625 - 0.05 <= r <= 1.0 for r in ratios) and sum(ratios) / 3 <= 0.75 + 1e-9
    from safetensors.torch import load_file

    W0 = load_file(str(pave_zoo["base"] / "model.safetensors"))[name]
    tau = load_file(str(pave_zoo["models"][0] / "model.safetensors"))[name] - W0
    out = purifier("task0", name, W0, tau)
    scaling = purifier.scaling("task0", name)
    rank = purifier.ranks[("task0", name)]
    assert rank < 32
    assert int(torch.linalg.matrix_rank(scaling.forward(W0.double() + out.double()), rtol=1e-5)) == rank


# --- the delta target, the decomposition store, the purified subset, the authors' ρ per method ---

def _purify_block(pave_zoo, **extra):
    return {"method": "co_svd", "samples": 200, "data": {m.name: str(pave_zoo["data"]) for m in pave_zoo["models"]},
            **extra}


def _pave_recipe(pave_zoo, method="task_arithmetic", **extra):
    return build_recipe({"base": str(pave_zoo["base"]), "models": [str(m) for m in pave_zoo["models"]],
                         "method": method, "task_specific": r"^classifier\.",
                         "purify": _purify_block(pave_zoo, **extra)})


def _numpy_delta(tau: np.ndarray, C_reg: np.ndarray, rank: int) -> np.ndarray:
    """SVD_r(τ C) C⁻¹ in float64 NumPy."""
    U, S, Vt = np.linalg.svd(tau @ C_reg, full_matrices=False)
    low = (U[:, :rank] * S[:rank]) @ Vt[:rank]
    return np.linalg.solve(C_reg.T, low.T).T


def test_delta_target_against_a_float64_numpy_reference(pave_zoo, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from primerge.purify import build_purifier
    from primerge.purify.pave import shifted

    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = _pave_recipe(pave_zoo, target="delta", rank_ratio=0.75, allocation="uniform")
    purifier = build_purifier(recipe)
    name = "encoder.layer.1.intermediate.dense.weight"
    W0 = load_file(str(pave_zoo["base"] / "model.safetensors"))[name]
    merged = primerge.merge_recipe(recipe.replace(parameters={"scale": 1.0}))
    expected = np.zeros(W0.shape)
    for model in pave_zoo["models"]:
        label = model.name
        tau = (load_file(str(model / "model.safetensors"))[name] - W0).double()
        module = purifier.modules[(label, name)]
        eps = purifier._eps[(label, module)]
        C_reg = shifted(purifier.covariances[label].cov[module], eps).numpy()
        rank = purifier.ranks[(label, name)]
        assert rank == round(0.75 * 32)
        reference = _numpy_delta(tau.numpy(), C_reg, rank)
        ours = purifier(label, name, W0, tau.float()).double().numpy()
        assert np.abs(ours - reference).max() <= 1e-6 * np.abs(reference).max()
        assert np.linalg.matrix_rank(ours @ C_reg, tol=1e-6 * np.abs(reference @ C_reg).max()) == rank
        expected += reference
    update = (merged.state_dict[name].double() - W0.double()).numpy()
    assert np.abs(update - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("target", ["weight", "delta"])
def test_one_decomposition_gives_every_rank_of_the_direct_purification(target):
    from primerge.purify.store import decompose

    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 9, generator=g, dtype=F64)
    tau = 0.05 * torch.randn(12, 9, generator=g, dtype=F64)
    scaling = make_scaling("co_svd", spd(9, 2))
    Y = tau if target == "delta" else base + tau
    (found,) = decompose(scaling.forward(Y)[None], [scaling.inverse], start=4)
    assert torch.allclose(found.S, torch.linalg.svdvals(scaling.forward(Y)), atol=1e-12)
    for rank in range(4, 10):
        direct = purified_task_vector(base, tau, scaling, rank, target=target).double()
        assert torch.allclose(found.purified(tau, rank), direct, atol=1e-6), rank
    assert found.purified(tau, 3) is None  # below the stored tail: the caller purifies directly


def test_paper_rank_ratio_per_method(bert_zoo):
    def ratio(method, **block):
        recipe = build_recipe({"base": bert_zoo["base"], "models": [str(p) for p in bert_zoo["models"]],
                               "method": method, "purify": {"method": "svd", **block}})
        return parse_purify(recipe).rank_ratio

    assert (ratio("ties"), ratio("task_arithmetic"), ratio("emr"), ratio("prime")) == (63 / 64, 31 / 32, 7 / 8, 15 / 16)
    assert ratio("ties", rank_ratio=0.5) == 0.5


def test_purified_subset(pave_zoo, tmp_path, monkeypatch):
    from primerge.purify import build_purifier

    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RecipeError, match="purify.tasks: 'task7' is not a model.*task1"):
        parse_purify(_pave_recipe(pave_zoo, tasks=["task7"]))
    recipe = _pave_recipe(pave_zoo, tasks=["task1"], rank_ratio=0.75)
    recipe.purify["data"] = {"task1": recipe.purify["data"]["task1"]}  # data only for the purified model
    purifier = build_purifier(recipe)
    assert set(purifier.ratios) == {"task1"} and {label for label, _ in purifier.ranks} == {"task1"}
    from safetensors.torch import load_file

    name = "encoder.layer.0.attention.self.query.weight"
    W0 = load_file(str(pave_zoo["base"] / "model.safetensors"))[name]
    taus = [load_file(str(m / "model.safetensors"))[name] - W0 for m in pave_zoo["models"]]
    assert purifier("task0", name, W0, taus[0]) is taus[0]
    assert not torch.allclose(purifier("task1", name, W0, taus[1]), taus[1], atol=1e-4)


def test_decompositions_are_cached_per_model_and_settings(pave_zoo, tmp_path, monkeypatch):
    from primerge.purify import build_purifier, store

    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "STORE", store.DecompositionStore())
    monkeypatch.setattr("primerge.purify.pave.STORE", store.STORE)
    recipe = _pave_recipe(pave_zoo, rank_ratio=7 / 8)
    first = primerge.merge_recipe(recipe)
    files = sorted((tmp_path / "cache" / "pave").glob("*.safetensors"))
    assert len(files) == 3  # one per model

    def no_svd(*args, **kwargs):
        raise AssertionError("a cached decomposition was computed again")

    monkeypatch.setattr("primerge.purify.pave.decompose", no_svd)
    monkeypatch.setattr("primerge.purify.pave.STORE", store.DecompositionStore())  # from disk this time
    again = primerge.merge_recipe(recipe)
    other_rho = build_purifier(_pave_recipe(pave_zoo, rank_ratio=31 / 32))  # the same decompositions
    assert all(torch.equal(first.state_dict[k], v) for k, v in again.state_dict.items())
    assert set(other_rho.ratios) == {"task0", "task1", "task2"}
    monkeypatch.undo()
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    build_purifier(_pave_recipe(pave_zoo, rank_ratio=7 / 8, target="delta"))  # other settings: new files
    assert len(list((tmp_path / "cache" / "pave").glob("*.safetensors"))) == 6


def test_plan_refuses_a_bad_purify_block_before_opening_a_checkpoint(tmp_path, capsys):
    """The block is validated with the recipe: ``primerge plan`` names the unknown field (and exits 2)
    although neither checkpoint exists — nothing was opened."""
    from primerge.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {tmp_path / 'no-base'}\nmodels: [{tmp_path / 'no-model'}]\nmethod: ties\n"
                      "purify: {rho: 7.5, bogus: 1}\n")
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "purify block: unknown field 'purify.rho'" in err and "no such file" not in err
