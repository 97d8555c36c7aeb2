"""The EAGLE-3 baseline: config composes, training-time test overfits a fixed batch, the runtime drafter
computes exactly what training computes, both follow the speculators/vLLM convention (no entry for x_0),
save → load keeps the logits, bad folders get one clear error, the EAGLE-3 serving layout holds what it
documents, and a trained head is lossless (fp32 tiny target)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import compose_cfg, has_compiler
from dspark.inference import Eagle3Drafter, Engine, drafter_for
from dspark.inference.drafters import RequestState
from dspark.hub.layouts import LAYOUTS
from dspark.models.dspark import rope
from dspark.models.eagle3 import Eagle3Config, Eagle3Draft, eagle3_layer_ids
from dspark.core.errors import DSparkError
from dspark.hub.io import load_head
from dspark.train.data import collate
from dspark.train.trainer import Trainer, run as train

FAST = ["target=tiny", "draft=eagle3", "logger=none", "batch_size=2", "anchors_per_seq=8", "val_anchors_per_seq=8",
        "max_seq_len=96", "draft.gamma=5"]
MAX_NEW = [37, 20, 29]


def tiny_eagle3_head(target, draft_vocab=None, seed=0, **over):
    """A randomly initialised EAGLE-3 head for the tiny target (optionally with a reduced vocabulary)."""
    torch.manual_seed(seed)
    d2t = None if draft_vocab is None else torch.randperm(target.vocab_size)[:draft_vocab].sort().values
    cfg = Eagle3Config(target=target.name, target_hidden_size=target.hidden_size, target_vocab_size=target.vocab_size,
                       target_num_layers=target.num_layers, target_layer_ids=eagle3_layer_ids(target.num_layers),
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, gamma=5,
                       draft_vocab_size=draft_vocab or 0, **over)
    return Eagle3Draft(cfg, d2t).attach(target)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """An EAGLE-3 head trained through `dspark train` on the tiny self-distilled data."""
    out = tmp_path_factory.mktemp("e3")
    summary = train(compose_cfg("train", *FAST, f"output_dir={out}", f"data_dir={data_dir}", "max_steps=40",
                                "eval_every=20", "save_every=0", "optim.lr=3e-3", "optim.warmup_steps=5"))
    return out, summary


def test_config_composes_and_builds_an_eagle3_head(tiny_target):
    cfg = compose_cfg("train", "draft=eagle3")
    assert cfg.draft.architecture == "eagle3" and cfg.draft.name == "eagle3"
    compose_cfg("train", "draft=eagle3", "experiment=quick")
    from dspark.models.heads import build_head

    head = build_head(compose_cfg("train", "target=tiny", "draft=eagle3").draft, tiny_target, None)
    assert isinstance(head, Eagle3Draft) and head.config.kind == "eagle3"
    assert head.config.target_layer_ids == eagle3_layer_ids(tiny_target.num_layers)
    assert head.midlayer.self_attn.q_proj.in_features == 2 * tiny_target.hidden_size   # [embedding ; feature]
    assert "embed_weight" not in head.state_dict() and "lm_weight" not in head.state_dict()
    with pytest.raises(DSparkError, match="one decoder layer"):
        build_head(compose_cfg("train", "target=tiny", "draft=eagle3", "draft.num_layers=2").draft, tiny_target, None)
    assert eagle3_layer_ids(30) == [2, 15, 27]


def test_training_time_test_overfits_a_fixed_batch(data_dir, tmp_path):
    t = Trainer(compose_cfg("train", *FAST, f"output_dir={tmp_path}", f"data_dir={data_dir}", "optim.lr=3e-3",
                            "optim.warmup_steps=0"))
    assert isinstance(t.head, Eagle3Draft)
    batch = collate(t.train_rows[:2])
    losses = []
    for _ in range(30):
        loss, count, out = t.objective.forward_loss(batch, torch.Generator().manual_seed(0), t.head)
        (loss / count).backward()
        t.opt.step()
        t.opt.zero_grad()
        losses.append(float(loss.detach() / count))
    assert out["accept"].shape == out["valid"].shape == (2 * 8, 5)
    print("eagle3 overfit losses", [round(x, 3) for x in losses[::5]], round(losses[-1], 3))
    assert losses[-1] < losses[0] / 3, losses


def test_drafter_proposes_what_training_computes(tiny_target, tiny_prompts):
    """Greedy proposals through the runtime cache (across an update) equal the argmax chain of the
    training-time-test forward on the same sequence: run time and training compute the same thing."""
    head = tiny_eagle3_head(tiny_target, draft_vocab=200).eval()
    drafter = Eagle3Drafter(head, tiny_target)
    layers = list(head.config.target_layer_ids)

    def feats(tokens):
        with torch.no_grad():
            hs = tiny_target.model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        return torch.cat([hs[i] for i in layers], -1)[0]

    def trained_chain(tokens, drafted):
        ids = torch.tensor([tokens])
        n = len(tokens) - 1
        block = torch.tensor([[[tokens[-1]] + drafted[:-1]]])
        with torch.no_grad():
            logits = head(feats(tokens)[None], ids, torch.tensor([[n]]), torch.ones_like(ids, dtype=torch.bool), block)
        return head.d2t[logits[0, 0].argmax(-1)].tolist()

    prompt = tiny_prompts[1]
    s = RequestState(rid=0, tokens=list(prompt), n_prompt=len(prompt), max_new_tokens=50)
    drafter.start([s], [feats(prompt[:-1])])
    first = drafter.propose([s], [6])[0]
    assert first.probs is None and len(first.tokens) == 6 and all(0 < c <= 1 for c in first.confidences)
    assert first.tokens == trained_chain(s.tokens, first.tokens)
    # accept two drafts, the target adds a bonus token; the drafter gets the verified features
    new = first.tokens[:2] + [7]
    f = feats(s.tokens + new[:-1])[len(s.tokens) - 1:]
    s.tokens += new
    drafter.update([s], [2], [f])
    second = drafter.propose([s], [4])[0]
    assert second.tokens == trained_chain(s.tokens, second.tokens)



def speculators_reference(head, feats, ids, steps):
    """EAGLE-3 training-time test as `speculators` (eagle3/core.py, data.py `shift_batch`) and vLLM define
    it, written out by hand from the head's weights on one sequence: entry j = (token x_{j+1}, feature
    fc(g_j), position j+1); there is no entry for x_0. Step s feeds entry j the token x_{j+1+s} and the
    entry's step s−1 output; its query sees the step-0 entries ≤ j and its own entries of steps 1…s.
    → logits (steps, L−1, Vd); entry j predicts x_{j+2+s} at step s."""
    lay, att = head.midlayer, head.midlayer.self_attn
    n = ids.shape[1] - 1
    hid = head.fc(feats[:, :-1])                                               # (1, N, D): g_0 … g_{N−1}
    padded = torch.cat([ids, ids.new_zeros(1, steps)], 1)
    ks, vs, out = [], [], []
    for s in range(steps):
        pos = torch.arange(1 + s, n + 1 + s)[None]
        x = torch.cat([lay.input_layernorm(head.embed(padded[:, 1 + s:n + 1 + s])), lay.hidden_norm(hid)], -1)
        q = rope(att.q_proj(x).view(1, n, att.h, att.hd), pos, att.theta)[0]  # (N, h, hd)
        ks.append(rope(att.k_proj(x).view(1, n, att.kv, att.hd), pos, att.theta)[0].repeat_interleave(att.h // att.kv, 1))
        vs.append(att.v_proj(x).view(n, att.kv, att.hd).repeat_interleave(att.h // att.kv, 1))
        causal = torch.einsum("ihd,jhd->hij", q, ks[0]) / att.hd ** 0.5          # (h, N, N) over step-0 entries
        causal = causal.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        diag = torch.stack([(q * k).sum(-1).t() / att.hd ** 0.5 for k in ks[1:]], -1) if s else causal[..., :0]
        w = torch.softmax(torch.cat([causal, diag], -1), -1)                     # (h, N, N + s)
        o = torch.einsum("hij,jhd->ihd", w[..., :n], vs[0])
        for t, v in enumerate(vs[1:]):
            o = o + w[..., n + t].t()[..., None] * v
        h = hid + att.o_proj(o.reshape(1, n, -1))
        hid = h + lay.mlp(lay.post_attention_layernorm(h))
        out.append(head.logits(hid)[0])
    return torch.stack(out)


def test_forward_and_drafter_follow_the_speculators_convention(tiny_target, tiny_prompts):
    """Same weights, same logits as the hand-written speculators/vLLM convention (no entry for x_0), so
    the token at position 0 only reaches the head through the features; a one-token prompt (no entry
    yet) proposes nothing at first and stays lossless."""
    head = tiny_eagle3_head(tiny_target, draft_vocab=200, seed=5).eval()
    with torch.no_grad():
        for name, w in head.named_parameters():                               # norms away from their init
            if name.endswith("norm.weight"):
                w.mul_(1 + 0.3 * torch.randn_like(w))
    tokens = tiny_prompts[1] + tiny_prompts[2][:6]
    ids, g = torch.tensor([tokens]), head.config.gamma
    with torch.no_grad():
        hs = tiny_target.model(ids, output_hidden_states=True).hidden_states
        feats = torch.cat([hs[i] for i in head.config.target_layer_ids], -1)
        ref = speculators_reference(head, feats, ids, g)
        anchors = torch.tensor([[1, 2, 9, len(tokens) - g - 1]])
        block = ids[0, anchors[0, :, None] + torch.arange(g)][None]            # x_n … x_{n+γ−1}
        ours = head(feats, ids, anchors, torch.ones_like(ids, dtype=torch.bool), block)[0]
        for a, n in enumerate(anchors[0].tolist()):                            # our anchor n = their entry n−1
            torch.testing.assert_close(ours[a], ref[:, n - 1], atol=2e-5, rtol=1e-4)
        other = ids.clone()
        other[0, 0] = (other[0, 0] + 1) % tiny_target.vocab_size
        assert torch.equal(ours, head(feats, other, anchors, torch.ones_like(ids, dtype=torch.bool), block)[0])
    # run time: a one-token prompt has no entry (nothing to propose) until its first step, then drafts
    drafter = Eagle3Drafter(head, tiny_target)
    s = RequestState(rid=0, tokens=tokens[:1], n_prompt=1, max_new_tokens=20)
    drafter.start([s], None)
    assert drafter.propose([s], [4])[0].tokens == []
    prompts = [tokens[:1], tokens[:2], tiny_prompts[0]]
    plain = Engine(tiny_target).generate(prompts, 12).outputs
    assert Engine(tiny_target, Eagle3Drafter(head, tiny_target), gamma=3).generate(prompts, 12).outputs == plain

def test_save_load_identical_logits_and_clear_errors(tiny_target, tmp_path):
    head = tiny_eagle3_head(tiny_target, draft_vocab=120, seed=3)
    torch.nn.init.normal_(head.midlayer.hidden_norm.weight)   # not the init value: loading must restore it
    head.save_pretrained(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["architectures"] == ["Eagle3Draft"] and cfg["draft_vocab_size"] == 120
    back = load_head(tmp_path / "h").attach(tiny_target)
    assert isinstance(back, Eagle3Draft) and torch.equal(back.d2t, head.d2t) and torch.equal(back.t2d, head.t2d)
    b, n = 2, 11
    feats = torch.randn(b, n, len(head.config.target_layer_ids) * tiny_target.hidden_size)
    ids = torch.randint(0, tiny_target.vocab_size, (b, n))
    args = (feats, ids, torch.tensor([[3, 7], [5, 2]]), torch.ones(b, n, dtype=torch.bool),
            torch.randint(0, tiny_target.vocab_size, (b, 2, 5)))
    with torch.no_grad():
        assert torch.equal(head(*args), back(*args))
    assert isinstance(drafter_for(back, tiny_target), Eagle3Drafter)

    # missing weight, wrong shape, malformed config, a DSpark config, unreadable weights: one DSparkError each
    state = load_file(str(tmp_path / "h" / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in state.items() if k != "fc.weight"}, str(bad / "model.safetensors"))
    with pytest.raises(DSparkError, match="does not match its config.json"):
        load_head(bad)
    save_file({**state, "fc.weight": state["fc.weight"][:, :-1].contiguous()}, str(bad / "model.safetensors"))
    with pytest.raises(DSparkError, match="does not match its config.json"):
        load_head(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(DSparkError, match="does not match"):
        Eagle3Draft.from_pretrained(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(DSparkError, match="malformed"):
        Eagle3Draft.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "sequential_head": "markov"}))
    with pytest.raises(DSparkError, match="unknown keys"):
        Eagle3Draft.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["DSparkDraft"]}))
    with pytest.raises(DSparkError, match="not Eagle3Draft"):
        Eagle3Draft.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DSparkError, match="unreadable"):
        Eagle3Draft.from_pretrained(bad)
    with pytest.raises(DSparkError, match="not a draft head folder"):
        Eagle3Draft.from_pretrained(tmp_path / "nowhere")


def test_eagle3_serving_layout(tiny_target, tmp_path):
    """vllm/ (speculators EAGLE-3, loaded and compared in tests/test_speculators.py) and sglang/
    (LlamaForCausalLMEagle3) hold what hub/layouts.py documents."""
    head = tiny_eagle3_head(tiny_target, draft_vocab=100)
    identity = {"id": "tiny-hub-id", "name": "tiny", "revision": "abc", "architectures": ["LlamaForCausalLM"]}
    LAYOUTS["eagle3"].write(head, tmp_path, identity, torch.bfloat16)
    d, k = tiny_target.hidden_size, len(head.config.target_layer_ids)
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["transformer_layer_config"]["num_hidden_layers"] == 1
    assert cfg["eagle_aux_hidden_state_layer_ids"] == head.config.target_layer_ids and cfg["draft_vocab_size"] == 100
    assert cfg["speculators_config"]["verifier"] == {"name_or_path": "tiny-hub-id", "revision": "abc",
                                                     "architectures": ["LlamaForCausalLM"]}
    w = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    assert w["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * d and "layers.0.hidden_norm.weight" in w
    assert w["embed_tokens.weight"].shape == (tiny_target.vocab_size, d) and w["fc.weight"].shape == (d, k * d)
    sg = json.loads((tmp_path / "sglang" / "config.json").read_text())
    assert sg["architectures"] == ["LlamaForCausalLMEagle3"] and sg["num_hidden_layers"] == 1
    assert sg["draft_vocab_size"] == 100 and sg["vocab_size"] == tiny_target.vocab_size
    assert sg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == head.config.target_layer_ids
    s = load_file(str(tmp_path / "sglang" / "model.safetensors"))
    assert "embed_tokens.weight" not in s and "midlayer.hidden_norm.weight" in s
    for x in (w, s):
        assert torch.equal(torch.arange(100) + x["d2t"], head.d2t)               # offsets, as both engines read them
        assert x["t2d"].dtype == torch.bool and int(x["t2d"].sum()) == 100 and bool(x["t2d"][head.d2t].all())
        assert x["lm_head.weight"].shape == (100, d)
    torch.testing.assert_close(s["midlayer.mlp.down_proj.weight"].float(), head.midlayer.mlp.down_proj.weight.detach(),
                               atol=1e-2, rtol=1e-2)


def test_trained_head_reports_tau_and_is_lossless(tiny_target, tiny_prompts, trained):
    out, summary = trained
    rep = json.loads((out / "train.json").read_text())
    assert rep["objective"] == "eagle3" and rep["steps"] == 40 and len(rep["curve"]) == 2
    assert rep["val_tau"] > 1.0 and len(rep["val_acceptance_by_position"]) == 5
    assert rep["curve"][-1]["val_loss"] < rep["curve"][0]["val_loss"] * 1.05
    head = load_head(out / "head")
    plain = Engine(tiny_target).generate(tiny_prompts, MAX_NEW).outputs
    taus = []
    for gamma, batch in ((4, 1), (7, 3)):   # the random-head runs in test_runtime_lossless cover the full grid
        # int8 weights and compiled drafting (inference/int8_weights.py, compiled_head.py) change drafts only
        for weights, compiled in (("native", False), ("int8", False), ("native", gamma == 4 and has_compiler())):
            drafter = Eagle3Drafter(head, tiny_target, draft_weights=weights, draft_compile=compiled)
            outs = []
            for start in range(0, 3, batch):
                res = Engine(tiny_target, drafter, gamma=gamma).generate(
                    tiny_prompts[start:start + batch], MAX_NEW[start:start + batch])
                outs += res.outputs
                taus.append(res.summary()["tau"])
            assert outs == plain, f"eagle3 γ={gamma} R={batch} {weights} compiled={compiled} diverged from plain"
    assert max(taus) > 1.0   # the trained head gets drafts accepted, so rollback paths are exercised
