"""Every code block of the README works as written, on the test zoo.

The README's examples name ``models/bert-base``, ``models/bert-sst2``, ``models/bert-mnli``,
``recipe.yaml`` and ``merged/``: a workspace folder gets those (the tiny BERT zoo, the README's own
YAML recipe) and each block runs there. YAML blocks must parse (a recipe must validate), Python
blocks are executed, and every ``primerge ...`` line of a bash block is run through the CLI with
exit code 0 — except the commands in :data:`PARSE_ONLY`, which take longer than CI allows or need
hardware CI lacks; those are parsed by the real argument parser (every option must exist). Lines
that set up an environment (``pip``, ``bash scripts/...``, ``.``) are what CI itself runs.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from primerge import cli
from primerge.recipe import build_recipe

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README.read_text(), flags=re.S)
#: Commands only parsed, and why: fine-tuning zoos (minutes to an hour), the 100M-parameter
#: benchmark zoo, a GPU cluster, or lm-eval on a causal LM the test zoo is not.
PARSE_ONLY = {
    ("demo",): "fine-tunes a zoo",
    ("zoo",): "fine-tunes a zoo",
    ("tune",): "tunes on a fine-tuned zoo",
    ("eval",): "evaluates a fine-tuned zoo or a causal LM",
    ("bench",): "builds the 100M-parameter benchmark zoo",
    ("merge", "--gpus-per-worker"): "needs a Ray cluster with GPUs",
}
SETUP = ("pip ", "bash ", ". ", "cd ", "export ", "ray ")


@pytest.fixture()
def workspace(bert_zoo, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    for name, folder in {"bert-base": bert_zoo["base"], "bert-sst2": bert_zoo["models"][0],
                         "bert-mnli": bert_zoo["models"][1]}.items():
        shutil.copytree(folder, tmp_path / "models" / name)
    recipe = next(code for lang, code in BLOCKS if lang == "yaml" and code.startswith("base:"))
    (tmp_path / "recipe.yaml").write_text(recipe)
    shutil.copy(tmp_path / "recipe.yaml", tmp_path / "my.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def commands() -> list[str]:
    """Every ``primerge ...`` line of the README's bash blocks, comments stripped."""
    found = []
    for lang, code in BLOCKS:
        if lang != "bash":
            continue
        for line in code.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("primerge "):
                found.append(line)
            else:
                assert not line or line.startswith(SETUP), f"README bash line neither primerge nor setup: {line}"
    return found


def parse_only(argv: list[str]) -> str | None:
    for key, reason in PARSE_ONLY.items():
        if argv[0] == key[0] and all(option in argv for option in key[1:]):
            return reason
    return None


def test_readme_has_the_blocks_this_test_runs():
    langs = [lang for lang, _ in BLOCKS]
    assert langs.count("python") >= 1 and langs.count("yaml") >= 1 and len(commands()) >= 5


@pytest.mark.parametrize("code", [code for lang, code in BLOCKS if lang == "yaml"])
def test_yaml_blocks_parse_and_recipes_validate(code, workspace):
    data = yaml.safe_load(code)
    if isinstance(data, dict) and "base" in data and "models" in data:
        build_recipe(data, relative_to=workspace)


@pytest.mark.parametrize("code", [code for lang, code in BLOCKS if lang == "python"])
def test_python_blocks_run(code, workspace):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("line", commands())
def test_bash_commands_run(line, workspace, capsys):
    argv = shlex.split(line)[1:]
    reason = parse_only(argv)
    if reason is not None:
        args = cli.build_parser().parse_args(argv)
        assert callable(args.func), line
        return
    for out in ("merged", "merged-from-recipe"):
        shutil.rmtree(workspace / out, ignore_errors=True)
    code = cli.main(argv + (["--quiet"] if argv[0] == "merge" else []))
    assert code == 0, (line, capsys.readouterr().err)
