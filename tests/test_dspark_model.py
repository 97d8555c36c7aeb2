"""The DSpark head: packed training blocks equal the runtime's incremental blocks, save → load is exact,
the sequential head's reported distributions are the ones it samples from, and mismatches fail clearly."""
import json

import pytest
import torch

from conftest import tiny_head
from dspark.models.dspark import DSparkDraft, block_positions
from dspark.core.errors import DSparkError


def features(target, ids):
    with torch.no_grad():
        hs = target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i] for i in (2, 3)], -1)


@pytest.mark.parametrize("kind", ["markov", "rnn", "none"])
def test_packed_blocks_equal_one_block_at_a_time(tiny_target, tiny_prompts, kind):
    head = tiny_head(tiny_target, kind).eval()
    ids = tiny_prompts[1]
    feats = features(tiny_target, ids)
    anchors = torch.tensor([[5, 9, 20]])
    with torch.no_grad():
        packed = head.packed_blocks(feats, torch.tensor([ids]), anchors, torch.ones(1, len(ids), dtype=torch.bool))
        for j, n in enumerate(anchors[0].tolist()):
            kv = head.context_kv(head.project_context(feats[:, :n]), torch.arange(n)[None])
            g = head.config.gamma
            mask = torch.ones(1, g, n + g, dtype=torch.bool)
            single = head.backbone(head.block_inputs(torch.tensor([ids[n]])), block_positions(torch.tensor([n]), g),
                                   kv, mask)
            torch.testing.assert_close(packed[0, j], single[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["markov", "rnn", "none"])
def test_save_load_gives_identical_logits(tiny_target, tiny_prompts, tmp_path, kind):
    head = tiny_head(tiny_target, kind, draft_vocab=150).eval()
    head.save_pretrained(tmp_path)
    back = DSparkDraft.from_pretrained(tmp_path).attach(tiny_target).eval()
    ids = torch.tensor([tiny_prompts[2]])
    feats = features(tiny_target, tiny_prompts[2])
    anchors = torch.tensor([[3, 11]])
    prev = ids[:, :head.config.gamma].expand(2, -1)[None]
    args = (feats, ids, anchors, torch.ones_like(ids, dtype=torch.bool), prev)
    with torch.no_grad():
        for a, b in zip(head(*args), back(*args)):
            assert torch.equal(a, b)
    assert torch.equal(back.d2t, head.d2t)
    assert not any(k.startswith(("embed_weight", "lm_weight")) for k in back.state_dict())   # target parts not saved


def test_sampled_block_reports_the_distribution_it_samples(tiny_target, tiny_prompts):
    head = tiny_head(tiny_target, "markov").eval()
    feats = features(tiny_target, tiny_prompts[1])
    n, g = 12, head.config.gamma
    kv = head.context_kv(head.project_context(feats[:, :n]), torch.arange(n)[None])
    anchor = torch.tensor([tiny_prompts[1][n]])
    with torch.no_grad():
        h = head.backbone(head.block_inputs(anchor), block_positions(torch.tensor([n]), g), kv,
                          torch.ones(1, g, n + g, dtype=torch.bool))
        toks, probs, conf = head.sample_block(h, anchor, 1.0, torch.Generator().manual_seed(0))
        logits, conf_logits = head.teacher_forced(h, torch.cat([anchor, head.d2t[toks[0, :-1]]])[None])
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    torch.testing.assert_close(conf, torch.sigmoid(conf_logits))
    # the Markov bias really depends on the previous token
    other = head.teacher_forced(h, torch.full((1, g), 7))[0]
    assert not torch.allclose(other, logits)


def test_mismatches_fail_with_one_clear_error(tiny_target, tmp_path):
    head = tiny_head(tiny_target)
    head.config.target_hidden_size = 32
    with pytest.raises(DSparkError, match="hidden size"):
        head.attach(tiny_target)
    head = tiny_head(tiny_target)
    head.config.target_layer_ids = [2, 9]
    with pytest.raises(DSparkError, match="out of range"):
        head.attach(tiny_target)
    tiny_head(tiny_target).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_layers": 2}))
    with pytest.raises(DSparkError, match="does not match"):
        DSparkDraft.from_pretrained(tmp_path)
    with pytest.raises(DSparkError, match="not a draft head"):
        DSparkDraft.from_pretrained(tmp_path / "missing")
