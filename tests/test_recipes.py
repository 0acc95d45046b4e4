"""Every recipe in recipes/ parses through its script's Args (an unknown key fails the test), names its source in a
comment at the top, and the scripts' --preset tiny is the recipe in recipes/tiny/."""

from pathlib import Path

import pytest
import tyro
from conftest import ROOT, load_script

SCRIPTS = ["sft", "dpo", "wpo", "wspo", "hybrid_pairs", "generate", "weak_to_strong_cls", "vision_w2s"]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def script_of(recipe: Path) -> str:
    """The script a recipe is for: its file name is `<script>.yaml` or `<script>-<what>.yaml`."""
    stem = recipe.stem
    matches = [s for s in SCRIPTS if stem == s or stem.startswith(s + "-")]
    assert len(matches) == 1, f"{recipe}: name it <script>-<what>.yaml, script one of {SCRIPTS}"
    return matches[0]


@pytest.fixture(scope="module")
def modules():
    return {}


def test_there_are_recipes_for_every_paper_and_the_tiny_setting():
    folders = {p.parent.name for p in RECIPES}
    assert {"tiny", "wspo", "wpo", "weak_to_strong", "vision"} <= folders, folders
    assert {script_of(p) for p in RECIPES if p.parent.name == "tiny"} >= {"sft", "dpo", "wpo", "wspo",
                                                                          "weak_to_strong_cls", "vision_w2s"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_parses_through_its_scripts_args(recipe, modules):
    name = script_of(recipe)
    module = modules.setdefault(name, load_script(name))
    text = recipe.read_text()
    assert text.startswith("#"), f"{recipe}: the first lines name the source (paper table, repo file)"
    flags = module.read_config(str(recipe))  # an unknown key, a non-mapping or bad YAML exits 2 here
    args = tyro.cli(module.Args, args=flags, use_underscores=True)  # values type-checked as on the command line
    assert args.config == str(recipe)


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_unknown_key_fails_naming_the_closest_field(name, tmp_path, capsys):
    module = load_script(name)
    bad = tmp_path / f"{name}-typo.yaml"
    bad.write_text("# a typo\nlearning_rat: 1.0e-5\n" if hasattr(module.Args, "learning_rate") else "# a typo\nseedd: 1\n")
    with pytest.raises(SystemExit) as e:
        module.read_config(str(bad))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key" in err and ("'learning_rate'" in err or "'seed'" in err), err
