"""One key per head kind: every architecture in models/heads.py HEADS has its runtime drafter, its
training objective and (where it has one) its export layout under the same key, and a fresh head of
each kind builds from its conf/draft file, saves, reads back and drafts in the runtime."""
import pytest
import torch

from conftest import compose_cfg
from dspark.hub.layouts import LAYOUTS
from dspark.inference.head_drafters import DRAFTERS
from dspark.models.heads import HEADS, build_head, read_head
from dspark.train.objectives import OBJECTIVES


def test_every_layer_registers_the_same_keys():
    assert set(DRAFTERS) == set(HEADS) == set(OBJECTIVES)
    assert set(LAYOUTS) <= set(HEADS)
    assert all(cls.architecture == key for key, cls in HEADS.items())


@pytest.mark.parametrize("draft", ["tiny", "eagle3"])
def test_each_kind_builds_saves_reads_and_drafts(draft, tiny_target, tiny_prompts, tmp_path):
    from dspark.inference import Engine, drafter_for

    d = compose_cfg("train", "target=tiny", f"draft={draft}").draft
    head = build_head(d, tiny_target, None)
    assert head.architecture == (d.get("architecture") or "dspark")
    head.save_pretrained(tmp_path / "h")
    back = read_head(tmp_path / "h").attach(tiny_target)
    assert type(back) is type(head)
    engine = Engine(tiny_target, drafter_for(back, tiny_target), gamma=3)
    plain = Engine(tiny_target).generate(tiny_prompts, 8).outputs
    assert engine.generate(tiny_prompts, 8).outputs == plain   # fp32: lossless whatever the (random) head


def test_unknown_architecture_is_one_clear_error(tiny_target):
    from omegaconf import open_dict

    from dspark.core.errors import DSparkError

    d = compose_cfg("train", "target=tiny", "draft=tiny").draft
    with open_dict(d):
        d.architecture = "medusa"
    with pytest.raises(DSparkError, match="draft.architecture='medusa'"):
        build_head(d, tiny_target, None)


@pytest.mark.parametrize("draft", ["tiny", "eagle3"])
def test_each_kind_drafts_on_a_bf16_target(draft, tiny_prompts):
    """The runtime runs SmolLM2 in bf16: every drafter's tensors must follow the target's dtype (an fp32
    buffer beside bf16 keys made EAGLE-3's attention refuse to run). bf16 is not exact, so the check is that
    a batch of three decodes to full length with the head in bf16."""
    from omegaconf import OmegaConf

    from conftest import tiny_target_cfg
    from dspark.inference import Engine, drafter_for
    from dspark.models.target import load_target

    target = load_target(OmegaConf.merge(tiny_target_cfg(), {"dtype": "bfloat16"}))
    assert target.dtype == torch.bfloat16
    head = build_head(compose_cfg("train", "target=tiny", f"draft={draft}").draft, target, None)
    drafter = drafter_for(head, target)
    assert drafter.head.norm.weight.dtype == torch.bfloat16
    res = Engine(target, drafter, gamma=3).generate(tiny_prompts, 8)
    assert [len(o) for o in res.outputs] == [8, 8, 8]
