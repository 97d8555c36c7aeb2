"""Sequential Temperature Scaling: lowers ECE on deliberately miscalibrated data, keeps order, and
`dspark calibrate` writes temperatures the runtime then uses."""
import json

import pytest
import torch

from conftest import compose_cfg
from dspark.eval import sts


def synthetic_blocks(n, gamma, sharpen, seed):
    """Blocks whose true conditional survival is s_k; the reported confidence is σ(sharpen·logit(s_k))
    (sharpen > 1: overconfident; < 1: underconfident)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(n):
        s = torch.rand(gamma, generator=gen) * 0.9 + 0.05
        z = torch.log(s) - torch.log1p(-s)
        conf = torch.sigmoid(sharpen * z).tolist()
        survive = (torch.rand(gamma, generator=gen) < s).tolist()
        accepted = next((k for k, ok in enumerate(survive) if not ok), gamma)
        blocks.append((conf, gamma, accepted))
    return blocks


@pytest.mark.parametrize("sharpen", [3.0, 0.4])
def test_sts_lowers_ece_on_miscalibrated_data(sharpen):
    gamma = 4
    fit = sts.blocks_to_tensors(synthetic_blocks(4000, gamma, sharpen, 0), gamma)
    judge = sts.blocks_to_tensors(synthetic_blocks(4000, gamma, sharpen, 1), gamma)
    temps = sts.fit_sts(*fit)
    assert temps[0] == pytest.approx(sharpen, rel=0.25)          # undoes the sharpening at position 1
    report = sts.position_report(*judge, temps)
    for p in report:
        assert p["ece_after"] < p["ece_before"], p
        assert p["ece_after"] < 0.035, p
        assert p["brier_after"] <= p["brier_before"] + 1e-9
    # a temperature keeps the order of one position's confidences: position 1's AUROC is unchanged
    # (later positions rank products of differently scaled factors, so theirs may move a little)
    raw = sts.position_report(*judge, [1.0] * gamma)
    assert raw[0]["auroc"] == pytest.approx(report[0]["auroc"])
    assert [p["auroc"] for p in raw] == pytest.approx([p["auroc"] for p in report], abs=0.02)


def test_metrics_on_hand_made_values():
    p = torch.tensor([0.1, 0.1, 0.9, 0.9])
    y = torch.tensor([0.0, 1.0, 1.0, 1.0])
    # bins: 0.1 → freq 0.5 (gap 0.4, weight 1/2); 0.9 → freq 1 (gap 0.1, weight 1/2)
    assert sts.ece(p, y) == pytest.approx(0.25)
    assert sts.brier(p, y) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    assert sts.auroc(p, y) == pytest.approx(2.5 / 3)     # positive/negative pairs: 1, 1 and a tie
    assert sts.auroc(p, torch.ones(4)) is None


def test_calibrate_cli_writes_temperatures_the_runtime_uses(tmp_path):
    from dspark.data.generate import run as generate
    from dspark.eval.calibrate import run as calibrate
    from dspark.hub.io import load_head
    from dspark.train.trainer import run as train

    def cfg(name, *over):
        return compose_cfg(name, "target=tiny", f"output_dir={tmp_path}", *over)

    generate(cfg("generate", "data=mix", "data.sources=[{source:sharegpt,count:8},{source:gsm8k,count:8}]",
                 "max_prompts=16", "max_new_tokens=32"))
    train(cfg("train", "draft=tiny", "logger=none", "max_steps=30", "eval_every=30", "save_every=0",
              "val_fraction=0.3"))
    out = calibrate(cfg("calibrate", "val_fraction=0.3", "max_new_tokens=32", "min_blocks=5"))
    report = json.loads((tmp_path / "calibrate.json").read_text())
    domains = report["domains"]           # every source of the mix is fitted on and judged
    assert set(domains) == {"sharegpt", "gsm8k"}
    assert all(d["blocks"] > 0 and d["max_ece_after"] is not None for d in domains.values())
    assert sum(d["prompts"] for d in domains.values()) == report["prompts"]
    assert report["temperatures"] and all(t > 0 for t in report["temperatures"])
    assert out["max_ece_after"] == report["max_ece_after"]
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    head = load_head(tmp_path / "head")
    assert head.config.confidence_temperatures == pytest.approx(report["temperatures"], rel=1e-5)
    first = report["positions_fit"][0]        # position 1's grid includes T = 1: never worse in-sample
    assert first["ece_after"] <= first["ece_before"] + 1e-9


def test_held_out_prompts_take_every_domain_in_turn(tmp_path):
    """With more held-out prompts than max_prompts, each source still gets its share (a source-ordered
    dataset would otherwise give calibration only its first domain)."""
    import datasets
    from omegaconf import OmegaConf

    from dspark.eval.calibrate import held_out_prompts

    n = 31    # ids 0..29 fall in the 99 % validation split, 9999 (0x270f) in training
    datasets.Dataset.from_dict({
        "input_ids": [[5, 6, i + 7, 8, 9] for i in range(n)], "loss_mask": [[0, 0, 0, 1, 1]] * n,
        "prompt_id": [f"{i:08x}" for i in range(n - 1)] + ["0000270f"],
        "source": ["chat"] * 20 + ["code"] * 6 + ["math"] * 5,
    }).save_to_disk(str(tmp_path / "ds"))
    target = type("T", (), {"vocab_size": 100, "name": "tiny"})()
    cfg = OmegaConf.create({"data_dir": str(tmp_path / "ds"), "val_fraction": 0.99, "max_prompts": 9})
    got = held_out_prompts(cfg, target)
    assert {d: len(v) for d, v in got.items()} == {"chat": 3, "code": 3, "math": 3}
    assert all(p[:2] == [5, 6] and len(p) == 3 for v in got.values() for p in v)
