"""Targets load from a local folder through the same path a Hub id takes; shipped prompt sets parse."""
import json

import torch
from omegaconf import OmegaConf

from dspark.eval.prompts import load_prompts
from dspark.inference import Engine
from dspark.models.target import load_target


def test_local_folder_target_equals_original(tiny_target, tiny_prompts, tmp_path):
    folder = tmp_path / "tiny-copy"
    tiny_target.model.save_pretrained(folder, safe_serialization=True)
    tiny_target.tokenizer.save_pretrained(folder)
    assert not list(folder.glob("*.bin"))
    cfg = OmegaConf.create({"name": "x", "name_or_path": str(folder), "dtype": "float32",
                            "attn_implementation": "eager", "trust_remote_code": False, "revision": None})
    copy = load_target(cfg)
    assert copy.name == "tiny-copy" and copy.eos_token_ids == tiny_target.eos_token_ids
    assert copy.encode_chat("hi") == tiny_target.encode_chat("hi")
    ids = torch.tensor([tiny_prompts[1]])
    with torch.no_grad():
        torch.testing.assert_close(copy.model(ids).logits, tiny_target.model(ids).logits)
    assert Engine(copy).generate(tiny_prompts[:1], 8).outputs == Engine(tiny_target).generate(tiny_prompts[:1], 8).outputs


def test_shipped_prompt_sets():
    he = load_prompts(OmegaConf.create({"source": "humaneval", "limit": 20}))
    assert len(he) == 20 and "def has_close_elements" in he[0]
    mt = load_prompts(OmegaConf.create({"source": "mtbench", "limit": None}))
    assert len(mt) == 80 and "Hawaii" in mt[0]


def test_jsonl_prompt_shapes(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "a"}, {"turns": ["b", "ignored"]}, {"messages": [{"role": "system", "content": "s"},
                                                                       {"role": "user", "content": "c"}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_prompts(OmegaConf.create({"source": "jsonl", "path": str(f), "limit": None})) == ["a", "b", "c"]
