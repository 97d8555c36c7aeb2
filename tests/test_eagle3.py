"""The EAGLE-3 baseline: config composes, training-time test overfits a fixed batch, the runtime drafter
computes exactly what training computes, save → load keeps the logits, bad folders get one clear
error, the EAGLE-3 serving layout holds what it documents, and a trained head is lossless (fp32 tiny target)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import compose_cfg
from dspark.inference import Eagle3Drafter, Engine, drafter_for
from dspark.inference.drafters import RequestState
from dspark.hub.layouts import save_eagle3_layout
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
    head = tiny_eagle3_head(tiny_target, draft_vocab=100)
    save_eagle3_layout(head, tmp_path / "x", include_embedding=True)
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 100 and cfg["vocab_size"] == tiny_target.vocab_size
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == head.config.target_layer_ids
    w = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert torch.equal(torch.arange(100) + w["d2t"], head.d2t)                   # offsets, as vLLM reads them
    assert w["t2d"].dtype == torch.bool and int(w["t2d"].sum()) == 100 and bool(w["t2d"][head.d2t].all())
    assert w["lm_head.weight"].shape == (100, tiny_target.hidden_size)
    assert w["embed_tokens.weight"].shape == (tiny_target.vocab_size, tiny_target.hidden_size)
    d = tiny_target.hidden_size
    assert w["fc.weight"].shape == (d, len(head.config.target_layer_ids) * d)
    assert w["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * d and "midlayer.hidden_norm.weight" in w
    torch.testing.assert_close(w["midlayer.mlp.down_proj.weight"].float(),
                               head.midlayer.mlp.down_proj.weight.detach(), atol=1e-2, rtol=1e-2)


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
        if True:
            drafter = Eagle3Drafter(head, tiny_target)
            outs = []
            for start in range(0, 3, batch):
                res = Engine(tiny_target, drafter, gamma=gamma).generate(
                    tiny_prompts[start:start + batch], MAX_NEW[start:start + batch])
                outs += res.outputs
                taus.append(res.summary()["tau"])
            assert outs == plain, f"eagle3 γ={gamma} R={batch} diverged from plain greedy"
    assert max(taus) > 1.0   # the trained head gets drafts accepted, so rollback paths are exercised
