"""`Target`'s operations equal a plain Hugging Face forward on the tiny target, and nothing outside
models/target.py calls the Hugging Face model of a target."""
import ast
import pathlib

import torch

from conftest import REPO
from dspark.inference.cache import SlotCache
from dspark.models.dspark import default_layer_ids
from dspark.models.target import layer_features


def test_features_are_the_hidden_states_at_the_layers(tiny_target, tiny_prompts):
    n, h = tiny_target.num_layers, tiny_target.hidden_size
    layers = sorted({0, *default_layer_ids(n), n})
    width = max(len(p) for p in tiny_prompts)
    ids = torch.zeros(len(tiny_prompts), width, dtype=torch.long)
    for i, p in enumerate(tiny_prompts):
        ids[i, :len(p)] = torch.tensor(p)                    # right-padded, as training batches are
    feats, last = tiny_target.features(ids, layers)
    with torch.no_grad():
        out = tiny_target.model(ids, output_hidden_states=True)
    assert feats.shape == (len(tiny_prompts), width, len(layers) * h)
    for j, layer in enumerate(layers):
        assert torch.equal(feats[..., j * h:(j + 1) * h], out.hidden_states[layer]), f"layer {layer}"
    assert torch.equal(last, out.hidden_states[-1])
    assert torch.equal(layer_features(out.hidden_states, layers), feats)
    torch.testing.assert_close(tiny_target.logits(last), out.logits, atol=1e-5, rtol=1e-5)


def test_cached_forward_equals_a_plain_forward(tiny_target, tiny_prompts):
    ids = torch.tensor([tiny_prompts[1]])
    n = ids.shape[1]
    with torch.no_grad():
        ref = tiny_target.model(ids, output_hidden_states=True)
        cache = SlotCache()
        valid = torch.ones(1, n - 3, dtype=torch.bool)
        pre = tiny_target.cached_forward(ids[:, :-3], valid.long(), torch.arange(n - 3)[None], cache, logits_to_keep=1)
        cache.append_valid(valid)
        new = torch.ones(1, 3, dtype=torch.bool)
        step = tiny_target.cached_forward(ids[:, -3:], cache.attention_mask(new), torch.arange(n - 3, n)[None], cache,
                                          hidden=True)
    assert pre.logits.shape[1] == 1 and pre.hidden_states is None
    torch.testing.assert_close(pre.logits[:, 0], ref.logits[:, n - 4], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(step.logits, ref.logits[:, -3:], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(step.hidden_states[-1], ref.hidden_states[-1][:, -3:], atol=2e-4, rtol=1e-4)


def test_hf_generate_is_hugging_face_generate(tiny_target, tiny_prompts):
    ids = torch.tensor([tiny_prompts[0]])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tiny_target.hf_generate(ids, **kw), tiny_target.model.generate(ids, **kw))


def _on_target(node) -> bool:
    """`<…target>.model`: the Hugging Face model of a target (target, self.target, tiny_target, …)."""
    if not (isinstance(node, ast.Attribute) and node.attr == "model"):
        return False
    owner = node.value
    name = owner.attr if isinstance(owner, ast.Attribute) else owner.id if isinstance(owner, ast.Name) else ""
    return "target" in name.lower()


def test_only_target_calls_the_hugging_face_model():
    """`target.model(…)` and `target.model.<method>(…)` belong in models/target.py only (tests may call the
    plain model as their reference)."""
    root = pathlib.Path(REPO)
    folders = [d for d in root.iterdir() if d.is_dir() and d.name[0] not in "._" and d.name != "tests"]
    bad = []
    for f in sorted(f for d in folders for f in d.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.as_posix() == "models/target.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and (_on_target(node.func) or isinstance(node.func, ast.Attribute)
                                               and _on_target(node.func.value)):
                bad.append(f"{rel}:{node.lineno}: {ast.unparse(node.func)}(…)")
    assert not bad, "call the Target's operations (models/target.py) instead:\n" + "\n".join(bad)
