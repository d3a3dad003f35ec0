"""optim.official_param_groups: the groups of the official MAE/USP pretraining (timm's param_groups_weight_decay),
which decay the cls and mask tokens; usp's default does not."""

from __future__ import annotations

from timm.optim import param_groups_weight_decay

from usp.config import load_config
from usp.models import create_model
from usp.train.optim import param_groups


def _decayed(groups: list[dict], names: dict[int, str]) -> set[str]:
    return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}


def test_official_groups_equal_timms_and_decay_the_tokens():
    model = create_model("vit_t_2", latent_size=8, in_channels=4)
    names = {id(p): n for n, p in model.named_parameters()}
    official = _decayed(param_groups(model, 0.05, official=True), names)
    assert official == _decayed(param_groups_weight_decay(model, 0.05), names)  # the official code's own call
    assert {"cls_token", "mask_token"} <= official
    default = _decayed(param_groups(model, 0.05), names)
    assert official - default == {"cls_token", "mask_token"}  # the only difference (pos tables are frozen)


def test_recipe_switch_defaults_off():
    assert load_config(None, []).optim.official_param_groups is False
    assert load_config(None, ["optim.official_param_groups=true"]).optim.official_param_groups is True
