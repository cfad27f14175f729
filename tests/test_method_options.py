"""Each method's options are declared once, in its typed config; the recipe, the API and the CLI check
values against it, and every recipe field has its CLI flag."""

import dataclasses

import pytest

from quantkit.cli import build_parser, main
from quantkit.errors import QuantkitError
from quantkit.methods import AWQ, GPTQ, AWQConfig
from quantkit.recipe import Recipe


def test_awq_options_reach_its_config():
    recipe = Recipe(method="awq", method_options=["n_grid=4", "clip=false", "max_shrink=0.25"])
    recipe.validate()
    assert AWQ.from_recipe(recipe).config == AWQConfig(n_grid=4, clip=False, max_shrink=0.25)


def test_gptq_flags_and_options_combine():
    recipe = Recipe(method="gptq", damp_percent=0.05, method_options=["block_size=32"])
    config = GPTQ.from_recipe(recipe).config
    assert (config.damp_percent, config.block_size, config.act_order) == (0.05, 32, True)


@pytest.mark.parametrize("method,option,message", [
    ("awq", "n_grd=4", "awq has no option 'n_grd' (its options: clip, clip_grid, clip_qk, duo_scaling, max_shrink, "
                       "n_grid, search_rows)"),
    ("awq", "clip=maybe", "'maybe' is not a boolean"),
    ("awq", "n_grid=2.5", "'2.5' is not an int"),
    ("awq", "n_grid", "is not KEY=VALUE"),
    ("awq", "n_grid=0", "n_grid, search_rows and clip_grid must be >= 1"),
    ("gptq", "damp_percent=0.1", "gptq's damp_percent has its own flag; use --damp-percent"),
    ("rtn", "n_grid=4", "rtn has no option 'n_grid' (its options: none)"),
])
def test_bad_options_fail_in_one_line_naming_the_option(method, option, message):
    with pytest.raises(QuantkitError, match="--method-option") as info:
        Recipe(method=method, method_options=[option]).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_option_error_exits_2_before_any_work(tmp_path, capsys):
    code = main(["ship", "--method", "awq", "--method-option", "n_grid=0", "--out", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "o").exists()
    assert "n_grid, search_rows and clip_grid must be >= 1" in capsys.readouterr().err


def test_every_recipe_field_has_a_ship_flag_and_every_flag_a_field():
    ship = build_parser()._subparsers._group_actions[0].choices["ship"]
    recipe_groups = [g for g in ship._action_groups if g.title.startswith(("quantization", "data", "accuracy"))]
    dests = {a.dest for g in recipe_groups for a in g._group_actions}
    renamed = {"max_ppl_increase": "max_ppl_increase_pct"}
    fields = {f.name for f in dataclasses.fields(Recipe)}
    assert {renamed.get(d, d) for d in dests} == fields
    # and every flag says what it does
    assert all(a.help for a in ship._actions)


def test_ship_help_lists_each_methods_options(capsys):
    with pytest.raises(SystemExit):
        main(["ship", "--help"])
    out = capsys.readouterr().out
    for field in dataclasses.fields(AWQConfig):
        assert f"awq: {field.name} (" in out
    assert "gptq: block_size (int, default 128)" in out and "gptq: damp_percent" not in out
