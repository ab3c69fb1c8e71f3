import pytest
import torch

from trainer.model import Denoiser, ModelConfig, build_prx
from trainer.optim import AdamWConfig, MuonConfig, build_adamw, build_muon, group_by_pattern, lr_factor


def tiny_denoiser():
    torch.manual_seed(0)
    return Denoiser(build_prx(ModelConfig(preset="tiny"), in_channels=3, context_in_dim=16))


def fake_grads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_muon_groups_are_the_2d_block_weights():
    model = tiny_denoiser()
    groups = group_by_pattern(model, {"muon": ("prx.blocks.*",)}, rest="adamw", accept=lambda p: p.ndim == 2)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in groups["muon"]}
    adamw = {names[id(p)] for p in groups["adamw"]}
    assert "prx.blocks.0.attention.img_qkv_proj.weight" in muon and "prx.blocks.3.down_proj.weight" in muon
    assert "prx.blocks.0.modulation.lin.weight" in muon
    assert "prx.blocks.0.attention.norm_q.weight" in adamw  # 1-D norm scale inside a block
    assert "prx.blocks.0.modulation.lin.bias" in adamw
    assert {"prx.img_in.weight", "prx.txt_in.weight", "prx.final_layer.linear.weight"} <= adamw
    assert muon.isdisjoint(adamw) and len(muon) + len(adamw) == len(list(model.parameters()))


def test_muon_step_equals_torch_muon_used_directly():
    ours, ref = tiny_denoiser(), tiny_denoiser()
    cfg = MuonConfig(lr=0.02, adam_lr=1e-3)
    opt = build_muon(cfg, ours)
    muon_names = [n for n, p in ref.named_parameters() if n.startswith("prx.blocks.") and p.ndim == 2]
    params = dict(ref.named_parameters())
    ref_muon = torch.optim.Muon(
        [params[n] for n in muon_names],
        lr=0.02,
        weight_decay=0.0,
        momentum=0.95,
        nesterov=True,
        ns_steps=5,
        adjust_lr_fn="match_rms_adamw",
    )
    ref_adam = torch.optim.AdamW(
        [p for n, p in params.items() if n not in muon_names],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.0,
    )
    for step in range(2):
        fake_grads(ours, seed=step)
        fake_grads(ref, seed=step)
        opt.step()
        ref_muon.step()
        ref_adam.step()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_muon_and_adamw_state_round_trip_exactly():
    model = tiny_denoiser()
    opt = build_muon(MuonConfig(), model)
    fake_grads(model)
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"}
    other = build_muon(MuonConfig(), tiny_denoiser())
    other.load_state_dict(state)
    for name in ("muon", "adamw"):
        a, b = opt.optimizers[name].state_dict()["state"], other.optimizers[name].state_dict()["state"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k][f], b[k][f]) for k in a for f in a[k] if torch.is_tensor(a[k][f]))


def test_muon_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no parameter"):
        build_muon(MuonConfig(muon_params=("transformer.layers.*",)), tiny_denoiser())


def test_adamw_uses_the_studys_hyperparameters():
    opt = build_adamw(AdamWConfig(), tiny_denoiser()).optimizers["adamw"]
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-4, (0.9, 0.95), 1e-15, 0.0)


def test_warmup_is_linear_then_constant():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0) == 1.0


def test_muon_pattern_matching_nothing_is_a_validation_error(tiny_cfg):
    from trainer.config import TrainConfig

    tiny_cfg["optimizer"] = {"kind": "muon", "muon_params": ["transformer.layers.*"]}
    with pytest.raises(ValueError, match=r"optimizer.muon_params \['transformer.layers.\*'\] match no 2-D"):
        TrainConfig.model_validate(tiny_cfg)
    tiny_cfg["optimizer"] = {"kind": "muon"}
    TrainConfig.model_validate(tiny_cfg)  # the default pattern matches the PRX blocks
