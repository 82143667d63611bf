"""The registries are the one source of names and options: the distill and T. stddev config blocks, their --help
lines, the distiller line and the README's distiller table all come from (or agree with) them, so a new distiller
or scheme option cannot leave any of them behind."""
import dataclasses
import re
from typing import ClassVar

import pytest

from helpers import REPO, load_config
from kdjax import augment, distillers
from kdjax.augment import registry as scheme_registry
from kdjax.cli import describe_fields
from kdjax.configs import fields
from kdjax.distillers import registry as distiller_registry
from kdjax.distillers.logit import LogitDistiller


def readme_distiller_rows():
    """The names in the first column of the README's distiller table (the logit_stand plug-in row aside)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Distillers (`distiller=`)", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `([a-z_0-9]+)` \|", section, re.MULTILINE)}


def test_the_readme_table_lists_exactly_the_registered_distillers():
    assert readme_distiller_rows() == set(distillers.names())


def test_the_distill_block_and_its_help_come_from_the_distillers_options():
    config = load_config("distill")
    assert set(config.distill.keys()) == set(distillers.options())
    text = describe_fields(config, "distill")
    for name in distillers.options():
        line = next(row for row in text.splitlines() if row.strip().startswith(f"distill.{name} "))
        assert fields.help_for(f"distill.{name}") in line and len(fields.help_for(f"distill.{name}")) > 10
    distiller_line = next(row for row in text.splitlines() if row.strip().startswith("distiller "))
    assert all(name in distiller_line for name in distillers.names())
    # a shared option names every distiller that has it, with each one's default where they differ
    assert fields.help_for("distill.eps") == "pkt / vid: numerical epsilon (pkt 1e-07, vid 1e-05)"


@pytest.fixture
def a_new_logit_distiller():
    """A logit distiller written the way the README tells: one class, its decorator, its options."""
    @distillers.register
    @dataclasses.dataclass(frozen=True)
    class Halved(LogitDistiller):
        name: ClassVar[str] = "halved_kd"
        scale: float = distillers.option(0.5, "factor on the KL term")

        def logit_loss(self, logits_s, logits_t, labels, epoch, temperature):
            return self.scale * super().logit_loss(logits_s, logits_t, labels, epoch, temperature)

    yield Halved
    distiller_registry._REGISTRY.pop("halved_kd")


def test_a_new_distiller_is_one_decorated_class(a_new_logit_distiller):
    config = load_config("distill", "distiller=halved_kd")
    assert config.distill.scale is None and "halved_kd" in fields.help_for("distiller")
    assert fields.help_for("distill.scale") == "halved_kd: factor on the KL term (0.5)"
    config.distill.scale = 0.25
    from kdjax.train import kd
    method = kd.KDMethod.from_config(config)
    assert isinstance(method.distiller, a_new_logit_distiller) and method.distiller.scale == 0.25


def test_an_option_without_help_is_refused_where_it_is_declared():
    @distillers.register
    @dataclasses.dataclass(frozen=True)
    class Undocumented(LogitDistiller):
        name: ClassVar[str] = "undocumented"
        weight: float = 1.0
    try:
        with pytest.raises(TypeError, match="field 'weight' has no help"):
            distillers.options()
    finally:
        distiller_registry._REGISTRY.pop("undocumented")


def test_the_papers_nine_schemes_are_named_apart_from_the_registry():
    assert augment.PAPER_SCHEMES == ("identity", "flip", "crop_flip", "cutout", "autoaugment", "mixup", "cutmix",
                                     "cutmix_pick_s", "cutmix_pick_t")
    scheme_registry.builtin("tenth", label="Tenth")(lambda stats, opts: lambda key, x, y, score_fn=None: (x, {}))
    try:
        assert augment.names()[:9] == list(augment.PAPER_SCHEMES) and "tenth" in augment.names()
        assert "tenth" not in augment.PAPER_SCHEMES  # a scheme added to kdjax does not join the paper's nine
        assert load_config("sweep").augs == augment.PAPER_SCHEMES
    finally:
        scheme_registry._BUILTIN.pop("tenth")


@pytest.mark.parametrize("task, excluded", [("distill", ()), ("tstddev", ("criterion",))])
def test_the_augment_block_and_its_help_come_from_the_scheme_options(task, excluded):
    config = load_config(task)
    assert set(config.augment.keys()) == set(augment.option_names()) - set(excluded)
    for name in config.augment.keys():
        assert len(fields.help_for(f"augment.{name}")) > 10
    # every option reaches the scheme (cutout_size and policy were not settable before they were declared here)
    group = load_config(task).augment
    group.cutout_size, group.policy = 3, "imagenet"
    scheme = augment.create("cutout", dataset_stats=dict(mean=(0.5,) * 3, std=(0.25,) * 3, image_size=16),
                            **augment.options_from_config(group, 64))
    assert (scheme.options.cutout_size, scheme.options.policy, scheme.options.n_pick) == (3, "imagenet", 64)
