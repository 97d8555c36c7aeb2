"""Interop with the real `speculators` package (version pinned in the Makefile): `dspark export
vllm=true` writes folders that speculators loads strictly (every checkpoint weight matched by name and
shape, nothing missing but what speculators fills from the verifier) and that draft what dspark's own
drafters draft: the same draft logits (fp32) and the same greedy chains, for DSpark (Markov head,
reduced vocabulary, previous tokens outside it), the DFlash kind (full vocabulary) and EAGLE-3. Heads
the layout cannot express exactly are one clear error before the target is loaded. CPU, eager
attention, the tiny target saved as the verifier folder; plus a random head of SmolLM2-135M's shapes."""
import json
from importlib.metadata import version
from importlib.util import find_spec

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg, tiny_head
from dspark.core.errors import DSparkError
from dspark.hub import export
from dspark.hub.layouts import SPECULATORS_VERSION, dspark_layout
from dspark.inference.dspark_drafter import DSparkDrafter
from dspark.inference.drafters import RequestState
from dspark.inference.eagle3_drafter import Eagle3Drafter
from dspark.models.dspark import DSparkConfig, DSparkDraft
from dspark.models.eagle3 import Eagle3Config, Eagle3Draft, eagle3_layer_ids

MASK = 258          # the tiny target's spare special token (Target.spare_token_id)
ATOL = 1e-4         # fp32, same weights: the only difference is the order of float operations


@pytest.fixture(scope="module")
def spec():
    """The real package. Skipped only where it is not installed at all: an install missing one of
    the packages its import needs (the Makefile line) fails instead of skipping."""
    if find_spec("speculators") is None:
        pytest.skip("speculators is not installed (`make setup` pins and installs it)")
    import speculators

    assert version("speculators") == SPECULATORS_VERSION, "the Makefile pin and hub/layouts.py disagree"
    return speculators


@pytest.fixture(scope="module")
def verifier(tiny_target, tmp_path_factory):
    """The tiny target saved as a local Hugging Face folder: speculators reads the verifier's
    embedding, LM head and config from it (no network)."""
    folder = tmp_path_factory.mktemp("verifier")
    tiny_target.model.save_pretrained(folder)
    return str(folder)


def randomize(head, seed=1):
    """Every trainable weight random (norms around 1), so no part of the mapping hides behind zeros or ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)
    return head.eval()


def export_vllm(head, tmp_path, verifier):
    """`dspark export` (fp32, verifier = the saved tiny target) of `head`; returns vllm/."""
    head.save_pretrained(tmp_path / "head")
    export.run(compose_cfg("export", "target=tiny", f"output_dir={tmp_path}", f"target_id={verifier}", "dtype=float32"))
    return tmp_path / "export" / "vllm"


def load_strict(spec, folder, filled):
    """speculators' own load of `folder` (eager attention for CPU), after checking that the checkpoint
    and the model have the same keys, up to the `filled` ones it takes from the verifier, and shapes."""
    cfg = spec.SpeculatorModelConfig.from_pretrained(folder)
    cfg.transformer_layer_config._attn_implementation = "eager"
    model = spec.SpeculatorModel.from_pretrained(folder, config=cfg).eval()
    ckpt, mine = load_file(str(folder / "model.safetensors")), model.state_dict()
    assert sorted(set(mine) - set(ckpt)) == sorted(filled), "missing keys"
    assert sorted(set(ckpt) - set(mine)) == [], "unexpected keys"
    assert [k for k in ckpt if ckpt[k].shape != mine[k].shape] == []
    assert all(torch.isfinite(v).all() for k, v in mine.items() if v.is_floating_point() and "verifier" not in k)
    assert all(torch.equal(ckpt[k], mine[k]) for k in ckpt)
    return model


def features(target, ids, layers):
    return target.features(torch.tensor([ids]), layers)[0]


def report(what, delta, agree, agreement="greedy chains agree"):
    print(f"{what}: max |Δlogit| {delta:.2e}, {agreement} {agree}")


# ----------------------------------------------------------------------------------------- DSpark
def speculators_backbone(model, feats, ids, p):
    """speculators' DSpark backbone on the block anchored at p (its forward with p the only anchor
    candidate) → hidden states (B, D) and base logits (B, Vd)."""
    n, b = ids.shape[1], model.block_size
    only_p = torch.zeros(1, n, dtype=torch.long)
    only_p[0, p] = 1
    hidden, logits, _, _, idx = model._backbone_forward(feats, ids, only_p, torch.zeros(1, n, model.hidden_size),
                                                        torch.zeros(1, n, dtype=torch.long), max_anchors=1)
    assert idx.tolist() == list(range(p, p + b))
    return hidden.view(b, -1), logits.view(b, -1)


@torch.no_grad()
def speculators_block(model, feats, ids, p):
    """speculators' DSpark draft logits (B, Vd) and confidence logits (B,) of the block anchored at p,
    the previous token of slot k being ids[p + k] (teacher forcing), as its forward computes them."""
    return speculators_heads(model, *speculators_backbone(model, feats, ids, p), ids[0, p:p + model.block_size])


def speculators_heads(model, hidden, logits, prev):
    """The Markov bias and confidence of speculators' DSpark on backbone outputs (B, D) / (B, Vd)
    for previous tokens prev (B,) (target ids)."""
    if model.markov_head is None:
        return logits, model.confidence_head(hidden)
    emb = model.markov_head.prev_embeddings(prev)
    logits = logits + model.markov_head.block_bias(prev_token_ids=prev[None], hidden_states=hidden[None],
                                                   prev_emb=emb[None])[0]
    return logits, model.confidence_head(torch.cat([hidden, emb], -1))


@torch.no_grad()
def speculators_greedy(model, feats, ids, p):
    """speculators' greedy DSpark chain at anchor p: slot k conditioned on the token drafted at k−1."""
    hidden, logits = speculators_backbone(model, feats, ids, p)
    prev, toks, confs = ids[0, p:p + 1], [], []
    for k in range(model.block_size):
        lg, conf = speculators_heads(model, hidden[k:k + 1], logits[k:k + 1], prev)
        tok = lg.argmax(-1)
        prev = tok + model.d2t[tok] if model.d2t is not None else tok     # draft id → target id
        toks.append(int(prev))
        confs.append(float(torch.sigmoid(conf)))
    return toks, confs


@torch.no_grad()
def ours_block(head, feats, ids, p):
    """Our head's draft logits (γ, Vd) and confidence logits (γ,) of the block anchored at p, teacher forced."""
    h = head.packed_blocks(feats, ids, torch.tensor([[p]]), torch.ones_like(ids, dtype=torch.bool))
    return (x[0, 0] for x in head.teacher_forced(h, ids[:, p:p + head.config.gamma][:, None]))


def drafter_greedy(drafter, ids, feats, p):
    """Our runtime drafter's proposal at anchor p (target ids, confidences)."""
    state = RequestState(rid=0, tokens=ids[0, :p + 1].tolist(), n_prompt=p + 1, max_new_tokens=64)
    drafter.start([state], [feats[0, :p]])
    prop = drafter.propose([state], [drafter.head.config.gamma])[0]
    return prop.tokens, prop.confidences


@pytest.mark.parametrize("kind", ["markov-reduced-vocab", "dflash-full-vocab"])
def test_dspark_export_loads_strictly_and_drafts_the_same(spec, tiny_target, tiny_prompts, verifier, tmp_path, kind):
    markov = kind.startswith("markov")
    head = randomize(tiny_head(tiny_target, "markov" if markov else "none", draft_vocab=150 if markov else None,
                               qk_norm=True, mask_token_id=MASK))
    head.config.confidence_temperatures = [1.25] * 5        # kept as an extra key; drafts compare uncalibrated
    folder = export_vllm(head, tmp_path, verifier)
    config = json.loads((folder / "config.json").read_text())
    c = head.config
    assert config["aux_hidden_state_layer_ids"] == c.target_layer_ids and config["block_size"] == c.gamma == 5
    assert config["markov_rank"] == (c.head_rank if markov else 0) and config["mask_token_id"] == MASK
    assert config["confidence_head_with_markov"] is markov and config["sample_from_anchor"] is True
    assert config["speculators_config"]["verifier"]["name_or_path"] == verifier
    assert config["transformer_layer_config"]["head_dim"] == c.head_dim
    filled = {"embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight"} | (
        set() if markov else {"lm_head.weight"})                # full vocabulary: speculators takes the verifier's
    model = load_strict(spec, folder, filled)
    assert model.config.dspark_confidence_temperatures == [1.25] * 5
    assert torch.equal(model.lm_head.weight, head.lm_weight)   # tiny_head attached the target's rows
    assert torch.equal(model.embed_tokens.weight, tiny_target.model.get_input_embeddings().weight)
    head.config.confidence_temperatures = []

    ids = torch.tensor([tiny_prompts[2][:24]])
    if markov:   # previous tokens outside the draft vocabulary: the anchor at 9 and a teacher-forced one
        outside = torch.nonzero(head.t2d == c.draft_vocab_size)[:, 0]
        assert len(outside) == tiny_target.vocab_size - 150
        ids[0, 9], ids[0, 11] = outside[0], outside[-1]
    feats = features(tiny_target, ids[0].tolist(), c.target_layer_ids)
    delta, chains, drafter = 0.0, [], DSparkDrafter(head, tiny_target)
    for p in (3, 9, 15):
        ours, ours_conf = ours_block(head, feats, ids, p)
        theirs, theirs_conf = speculators_block(model, feats, ids, p)
        delta = max(delta, float((ours - theirs).abs().max()), float((ours_conf - theirs_conf).abs().max()))
        chains.append((drafter_greedy(drafter, ids, feats, p), speculators_greedy(model, feats, ids, p)))
    agree = all(toks == spec_toks for (toks, _), (spec_toks, _) in chains)
    report(f"DSpark {kind}", delta, agree)
    assert delta < ATOL and agree
    assert all(confs == pytest.approx(spec_confs, abs=ATOL) for (_, confs), (_, spec_confs) in chains)


def test_smollm2_shaped_head_matches_speculators(spec):
    """A random head with SmolLM2-135M's real shapes (576 wide, 9/3 heads, 49152-token vocabulary,
    8192-token draft vocabulary, 5 target layers, rank 64): strict key/shape match and equal logits."""
    from speculators.models.dspark import DSparkDraftModel

    torch.manual_seed(0)
    v, d, vd = 49152, 576, 8192
    c = DSparkConfig(target="smollm2-135m", target_hidden_size=d, target_vocab_size=v, target_num_layers=30,
                     num_layers=1, rope_theta=100000.0, gamma=7, head_rank=64, draft_vocab_size=vd, qk_norm=True,
                     mask_token_id=0)
    head = randomize(DSparkDraft(c, torch.randperm(v)[:vd].sort().values), seed=2)
    head.embed_weight = torch.randn(v, d) * 0.05
    head.lm_weight = head.embed_weight[head.d2t]               # SmolLM2 ties its LM head to the embedding
    identity = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "name": "smollm2-135m", "revision": None,
                "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 8192}
    config, state = dspark_layout(head, identity, torch.float32)
    assert config["aux_hidden_state_layer_ids"] == [2, 8, 15, 22, 29]
    cfg = spec.SpeculatorModelConfig.model_validate(config)
    cfg.transformer_layer_config._attn_implementation = "eager"
    model = DSparkDraftModel(cfg).eval()
    mine = model.state_dict()
    assert sorted(set(mine) - set(state)) == ["embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight"]
    assert sorted(set(state) - set(mine)) == [] and [k for k in state if state[k].shape != mine[k].shape] == []
    model.load_state_dict(state, strict=False)
    model.embed_tokens.weight.data.copy_(head.embed_weight)    # what speculators takes from the verifier
    ids = torch.randint(0, v, (1, 20))
    ids[0, 8] = int(torch.nonzero(head.t2d == vd)[0])           # an anchor outside the draft vocabulary
    feats = torch.randn(1, 20, 5 * d)
    ours = next(ours_block(head, feats, ids, 8))
    theirs = speculators_block(model, feats, ids, 8)[0]
    report("DSpark SmolLM2-shaped", float((ours - theirs).abs().max()), bool((ours.argmax(-1) == theirs.argmax(-1)).all()),
           "argmax agrees at every slot")
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------- EAGLE-3
def eagle3_head(target, draft_vocab):
    torch.manual_seed(3)
    d2t = torch.randperm(target.vocab_size)[:draft_vocab].sort().values
    c = Eagle3Config(target=target.name, target_hidden_size=target.hidden_size, target_vocab_size=target.vocab_size,
                     target_num_layers=target.num_layers, target_layer_ids=eagle3_layer_ids(target.num_layers),
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, gamma=4,
                     draft_vocab_size=draft_vocab)
    return randomize(Eagle3Draft(c, d2t), seed=4).attach(target)


@torch.no_grad()
def speculators_ttt(model, feats, ids, steps):
    """speculators' EAGLE-3 training-time-test logits: list over steps of (L−1, Vd); entry j holds the
    token x_{j+1} and the feature of position j (its data convention), captured at the LM head."""
    out = []
    hook = model.lm_head.register_forward_hook(lambda mod, i, o: out.append(o[0]))
    n = ids.shape[1]
    model(hidden_states=feats[:, :-1], input_ids=ids[:, 1:], document_ids=torch.zeros(1, n - 1, dtype=torch.long),
          position_ids=torch.arange(1, n)[None], ttt_steps=steps)
    hook.remove()
    return out


def test_eagle3_export_loads_strictly_and_drafts_the_same(spec, tiny_target, tiny_prompts, verifier, tmp_path):
    head = eagle3_head(tiny_target, 100)
    folder = export_vllm(head, tmp_path, verifier)
    config = json.loads((folder / "config.json").read_text())
    c = head.config
    assert config["speculators_model_type"] == "eagle3" and config["transformer_layer_config"]["model_type"] == "llama"
    assert config["eagle_aux_hidden_state_layer_ids"] == c.target_layer_ids
    model = load_strict(spec, folder, {"verifier_lm_head.weight", "verifier_norm.weight"})
    assert torch.equal(model.embed_tokens.weight, tiny_target.model.get_input_embeddings().weight)
    sglang = json.loads((tmp_path / "export" / "sglang" / "config.json").read_text())
    assert sglang["architectures"] == ["LlamaForCausalLMEagle3"]
    assert "midlayer.hidden_norm.weight" in load_file(str(tmp_path / "export" / "sglang" / "model.safetensors"))

    ids = torch.tensor([tiny_prompts[2][:20]])
    feats = features(tiny_target, ids[0].tolist(), c.target_layer_ids)
    theirs = speculators_ttt(model, feats, ids, c.gamma)
    delta = 0.0
    for n in (2, 7, 12):
        with torch.no_grad():
            ours = head(feats, ids, torch.tensor([[n]]), torch.ones_like(ids, dtype=torch.bool),
                        ids[:, n:n + c.gamma][:, None])[0, 0]
        delta = max(delta, max(float((ours[s] - theirs[s][n - 1]).abs().max()) for s in range(c.gamma)))
    # greedy: our drafter's chain, fed back to speculators as the ground truth, is its own argmax chain
    agree = True
    for n in (5, 11):
        toks, _ = drafter_greedy(Eagle3Drafter(head, tiny_target), ids, feats, n)
        chain = torch.tensor([ids[0, :n + 1].tolist() + toks])
        steps = speculators_ttt(model, features(tiny_target, chain[0].tolist(), c.target_layer_ids), chain,
                                c.gamma)
        best = [int(steps[s][n - 1].argmax()) for s in range(c.gamma)]
        agree &= [t + int(model.d2t[t]) for t in best] == toks
    report("EAGLE-3", delta, agree)
    assert delta < ATOL and agree


# ----------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("case", ["rnn", "old"])
def test_heads_the_layout_cannot_express_are_one_clear_error(tiny_target, tmp_path, monkeypatch, case):
    over = {"rnn": dict(sequential_head="rnn", qk_norm=True, mask_token_id=MASK), "old": dict(qk_norm=False, mask_token_id=-1)}[case]
    tiny_head(tiny_target, **over).save_pretrained(tmp_path / "head")
    monkeypatch.setattr(export, "load_target", lambda *a: pytest.fail("the target was loaded before the refusal"))
    with pytest.raises(DSparkError) as e:
        export.run(compose_cfg("export", "target=tiny", f"output_dir={tmp_path}"))
    msg = str(e.value)
    assert "\n" not in msg and "speculators layout" in msg and "vllm=false" in msg and "retrain" in msg
    assert all(w in msg for w in {"rnn": ["RNN"], "old": ["qk_norm", "mask_token_id"]}[case])
    assert not (tmp_path / "export").exists()
    export.run(compose_cfg("export", "target=tiny", f"output_dir={tmp_path}", "vllm=false"))   # the stated fix
    assert not (tmp_path / "export" / "vllm").exists() and (tmp_path / "export" / "model.safetensors").is_file()
