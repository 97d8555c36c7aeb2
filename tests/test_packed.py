"""Packed ragged verification (inference/packed.py): the same logits, cache and outputs as the padded
step, with only the admitted tokens run through the target."""
import torch

from conftest import tiny_head
from dspark.inference import DSparkDrafter, Engine
from dspark.inference.cache import SlotCache
from dspark.inference.drafters import Drafter, Proposal, PromptLookupDrafter
from dspark.inference.packed import Packing, packed_forward
from dspark.models.attention import plain_causal


def _prefilled(target, prompts):
    """A slot cache holding the left-padded prompts, plus each row's next position."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], valid[i, width - len(p):] = torch.tensor(p), True
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    cache = SlotCache()
    target.cached_forward(ids, valid.long(), pos, cache)
    cache.append_valid(valid)
    return cache, torch.tensor([len(p) for p in prompts])


def test_packed_step_equals_the_padded_step(tiny_target, tiny_prompts):
    sizes = [1, 4, 2]                                 # anchor + drafts per row: ragged
    width = max(sizes)
    torch.manual_seed(0)
    ids = torch.randint(3, tiny_target.vocab_size, (3, width))
    new_valid = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
    runs = []
    for packed in (False, True):
        cache, nxt = _prefilled(tiny_target, tiny_prompts)
        pos = nxt[:, None] + torch.arange(width)[None, :]
        if packed:
            p = Packing.of(sizes, width, ids.device)
            out = packed_forward(tiny_target, ids, cache.valid, new_valid, pos, cache, (tiny_target.num_layers,), p)
            logits, hidden = out.logits, out.hidden_states[-1]
            assert tiny_target.model.config._attn_implementation == "eager"   # restored after the forward
        else:
            out = tiny_target.cached_forward(ids, cache.attention_mask(new_valid), pos, cache, hidden=True)
            logits, hidden = out.logits, out.hidden_states[-1]
        keys = cache.layers[0].keys[:, :, -width:]
        runs.append((logits[new_valid], hidden[new_valid], keys.transpose(1, 2)[new_valid]))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class Ragged(Drafter):
    """Proposes plain greedy's own continuation, cut to a different length per request and step, and
    counts the steps that packed their rows."""

    def __init__(self, streams):
        self.streams, self.step = streams, 0

    def propose(self, states, limits):
        self.step += 1
        out = []
        for i, (s, limit) in enumerate(zip(states, limits)):
            done = len(s.tokens) - s.n_prompt
            n = min(limit, (self.step + 2 * i) % 4)
            out.append(Proposal(tokens=self.streams[s.rid][done:done + n]))
        return out


def test_ragged_rows_are_packed_and_outputs_stay_plain(tiny_target, tiny_prompts, monkeypatch):
    prompts = tiny_prompts + tiny_prompts[:1]
    plain = Engine(tiny_target).generate(prompts, 24).outputs
    packed_steps = []
    real = tiny_target.cached_forward

    def watch(*args, **kw):
        packed_steps.append("dspark_packing" in kw)
        return real(*args, **kw)

    monkeypatch.setattr(tiny_target, "cached_forward", watch)
    for drafter in (Ragged(dict(enumerate(plain))), PromptLookupDrafter(),
                    DSparkDrafter(tiny_head(tiny_target), tiny_target)):
        packed_steps.clear()
        res = Engine(tiny_target, drafter, gamma=4).generate(prompts, 24)
        assert res.outputs == plain, type(drafter).__name__
        if isinstance(drafter, Ragged):
            assert sum(packed_steps) >= 3 and res.stats.summary()["tau"] > 1.5
    packed_steps.clear()
    unpacked = Engine(tiny_target, Ragged(dict(enumerate(plain))), gamma=4, packed=False).generate(prompts, 24)
    assert unpacked.outputs == plain and not any(packed_steps)


def test_sampled_packed_steps_equal_padded_ones(tiny_target, tiny_prompts):
    """Same seeds, same draws: the packed path changes nothing a sampled run depends on."""
    runs = []
    for packed in (True, False):
        drafter = DSparkDrafter(tiny_head(tiny_target), tiny_target, temperature=1.0, seed=3)
        runs.append(Engine(tiny_target, drafter, gamma=4, temperature=1.0, packed=packed)
                    .generate(tiny_prompts, 20, seed=[5, 6, 7]).outputs)
    assert runs[0] == runs[1]


def test_step_cost_benchmark_prints_every_pair(capsys):
    from dspark.packed_cost import main

    main(["--target", "tiny", "--rows", "2", "--repeats", "1", "--decode-rows", "3", "--decode-contexts", "16"])
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| 2 |")]
    assert len(rows) == 2 and all(float(line.split("|")[-2]) > 0 for line in rows)
    decode = [line for line in out if line.startswith("| 3 | 16 |")]
    assert len(decode) == 1 and float(decode[0].split("|")[-2]) > 0


def test_proposal_cost_table_times_native_and_int8_weights(tiny_target, tmp_path, capsys):
    from dspark.packed_cost import main

    tiny_head(tiny_target).save_pretrained(tmp_path / "head")
    main(["--target", "tiny", "--head", str(tmp_path / "head"), "--context", "16", "--repeats", "2"])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in out if line.startswith("| native |")
            or line.startswith("| int8 |")}
    assert set(rows) == {"native", "int8"} and all(float(x) > 0 for r in rows.values() for x in r)
    assert float(rows["native"][1]) == 1.0


def test_only_full_causal_attention_is_packed(tiny_target, monkeypatch):
    """(Which configs are plain causal attention: tests/test_attention.py.)"""
    assert plain_causal(tiny_target.model.config) and Engine(tiny_target).packed
    monkeypatch.setattr(tiny_target.model.config, "sliding_window", 4096, raising=False)
    assert not Engine(tiny_target).packed and not Engine(tiny_target, packed=True).packed


def test_one_token_prompts_never_pack_an_empty_cache(tiny_target):
    """Nothing in the cache after the prefill of one-token prompts: the first step must run padded."""
    bos = tiny_target.eos_token_ids[0]
    plain = Engine(tiny_target).generate([[bos], [bos]], 8).outputs
    res = Engine(tiny_target, Ragged(dict(enumerate(plain))), gamma=4).generate([[bos], [bos]], 8)
    assert res.outputs == plain
