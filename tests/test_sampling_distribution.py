"""Rejection sampling keeps the target's distribution exactly: chi-square tests with a fixed seed.

Tolerance: the statistic must stay below the chi-square critical value at significance 0.001
(Wilson–Hilferty approximation), after merging bins whose expected count is below 5."""
import math

import pytest
import torch

from conftest import tiny_head
from dspark.inference import DSparkDrafter, Eagle3Drafter, Engine, RandomDrafter
from test_eagle3 import tiny_eagle3_head
from dspark.inference.verify import target_probs, verify_sampled


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    n = counts.sum().item()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    obs, exp = obs[keep].double(), exp[keep].double()
    stat = float(((obs - exp) ** 2 / exp).sum())
    k = len(exp) - 1
    z = 3.09   # one-sided 0.001
    crit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return stat, crit


def test_verify_sampled_matches_target_when_drafter_disagrees_badly():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.50, 0.25, 0.15, 0.07, 0.03, 0.00],
                      [0.05, 0.05, 0.10, 0.20, 0.25, 0.35]])
    q = torch.tensor([[0.01, 0.01, 0.01, 0.02, 0.05, 0.90],     # mass where p has none
                      [0.70, 0.10, 0.10, 0.05, 0.04, 0.01]])
    first, second = torch.zeros(6), torch.zeros(6)
    n = 6000
    for _ in range(n):
        drafts = [int(torch.multinomial(q[k], 1, generator=gen)) for k in range(2)]
        full = torch.cat([p, p[1:]])            # p at position 2 (bonus) unused by the checks below
        k, tok = verify_sampled(full, drafts, q, gen)
        seq = drafts[:k] + [tok]
        first[seq[0]] += 1
        if len(seq) > 1:
            second[seq[1]] += 1
        else:   # the second token would be drawn from p[1] at the next step: draw it the same way
            second[int(torch.multinomial(p[1], 1, generator=gen))] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        stat, crit = chi2_ok(counts, probs)
        assert stat < crit, (stat, crit, counts / n, probs)


def test_verify_sampled_point_mass_drafter():
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    counts = torch.zeros(3)
    for _ in range(4000):
        k, tok = verify_sampled(p, [2], None, gen)   # always proposes token 2
        counts[2 if k == 1 else tok] += 1
    stat, crit = chi2_ok(counts, p[0])
    assert stat < crit


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = target_probs(logits, 1.0, 0.8)
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))


@pytest.mark.parametrize("kind", ["random", "dspark", "eagle3"])
def test_engine_sampling_matches_target_distribution(tiny_target, tiny_prompts, kind):
    """End to end on the tiny target: the first two sampled tokens of many requests follow the target's
    exact distribution (marginal of the second computed by enumerating the first)."""
    prompt, temp, top_p = tiny_prompts[1], 1.3, 0.95
    with torch.no_grad():
        logits = tiny_target.model(torch.tensor([prompt])).logits[0, -1]
        p1 = target_probs(logits, temp, top_p)
        support = (p1 > 0).nonzero()[:, 0]
        ext = torch.cat([torch.tensor([prompt]).expand(len(support), -1), support[:, None]], 1)
        p2_given = target_probs(tiny_target.model(ext).logits[:, -1], temp, top_p)
        p2 = (p1[support, None] * p2_given).sum(0)
    first = torch.zeros(tiny_target.vocab_size)
    second = torch.zeros(tiny_target.vocab_size)
    drafter = (RandomDrafter(tiny_target.vocab_size, 3, seed=5, sharpness=1.0) if kind == "random" else
               Eagle3Drafter(tiny_eagle3_head(tiny_target, draft_vocab=200), tiny_target, temperature=temp)
               if kind == "eagle3" else
               DSparkDrafter(tiny_head(tiny_target, "markov", draft_vocab=200), tiny_target, temperature=temp))
    engine = Engine(tiny_target, drafter, gamma=3, temperature=temp, top_p=top_p)
    for seed in range(8):
        res = engine.generate([prompt] * 250, 2, seed=seed, eos_token_ids=[])
        for out in res.outputs:
            first[out[0]] += 1
            second[out[1]] += 1
    assert res.summary()["drafted"] > 0
    for counts, probs in ((first, p1), (second, p2)):
        stat, crit = chi2_ok(counts, probs)
        assert stat < crit, (stat, crit)
