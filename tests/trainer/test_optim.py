import pytest
import torch

from trainer.factors.muon import (
    ShardedMuon,
    assign_shares,
    muon_step_parts,
    ns_flops,
    ns_flops_per_rank,
    project_muon_step,
)
from trainer.factors.optimizer import (
    AdamWConfig,
    MuonConfig,
    build_adamw,
    build_muon,
    group_by_pattern,
    lr_factor,
)
from trainer.model import Denoiser, ModelConfig, build_prx
from trainer.runtime.dist import Dist

ONE = Dist(0, 1, 0, torch.device("cpu"))  # one process


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
    opt = build_muon(cfg, ours, ONE)
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
    opt = build_muon(MuonConfig(), model, ONE)
    fake_grads(model)
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"}
    other = build_muon(MuonConfig(), tiny_denoiser(), ONE)
    other.load_state_dict(state)
    for name in ("muon", "adamw"):
        a, b = opt.optimizers[name].state_dict()["state"], other.optimizers[name].state_dict()["state"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k][f], b[k][f]) for k in a for f in a[k] if torch.is_tensor(a[k][f]))


def test_muon_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no parameter"):
        build_muon(MuonConfig(muon_params=("transformer.layers.*",)), tiny_denoiser(), ONE)


def test_adamw_uses_the_studys_hyperparameters():
    opt = build_adamw(AdamWConfig(), tiny_denoiser(), ONE).optimizers["adamw"]
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


# PRX-1.2B's Muon matrices: 16 blocks of qkv, txt kv, out, gate, up, down, modulation
PRX_MUON_SHAPES = 16 * [
    (5376, 1792),
    (3584, 1792),
    (1792, 1792),
    (6272, 1792),
    (6272, 1792),
    (1792, 6272),
    (10752, 1792),
]


def test_muon_shares_balance_newton_schulz_flops():
    assert ns_flops((16, 24), ns_steps=1) == ns_flops((24, 16), ns_steps=1) == 4 * 16 * 16 * 24 + 2 * 16**3
    # the largest first, each to the lightest rank
    assert assign_shares([(8, 8), (32, 8), (16, 16), (8, 8)], 2) == [1, 1, 0, 1]
    for world in (2, 3, 8, 16):
        load = ns_flops_per_rank(PRX_MUON_SHAPES, world)
        assert max(load) / (sum(load) / world) < 1.01, (world, load)  # the busiest rank sets the pace
    assert assign_shares([(8, 8)] * 2, 3) == [0, 1]  # more ranks than matrices: the last one idles


def torch_muon_reference() -> tuple[list[torch.Tensor], dict]:
    """muon_worker's matrices after its steps of torch.optim.Muon in one process, and Muon's state."""
    import muon_worker

    ref = muon_worker.matrices()
    ref_opt = torch.optim.Muon(ref, **muon_worker.HYPER)
    for step in range(muon_worker.STEPS):
        muon_worker.set_grads(ref, step)
        ref_opt.step()
    return ref, ref_opt.state_dict()["state"]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_muon_on_gloo_processes_equals_one_process_torch_muon(world, tmp_path):
    import muon_worker

    # fork: the children start with torch already imported (spawn would pay its import per rank)
    args = (world, str(tmp_path / "init"), str(tmp_path))
    torch.multiprocessing.start_processes(muon_worker.run, args=args, nprocs=world, start_method="fork")
    ref, ref_state = torch_muon_reference()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    owner = ranks[0]["owner"]
    assert sorted(set(owner)) == list(range(world))  # each matrix has one owner; every rank has a share
    for rank, got in enumerate(ranks):
        mine = [shape for shape, r in zip(muon_worker.SHAPES, owner, strict=True) if r == rank]
        # Newton–Schulz on its share only, once a step
        assert sorted(got["calls"]) == sorted(mine * muon_worker.STEPS), rank
        for i, (a, b) in enumerate(zip(got["params"], ref, strict=True)):
            torch.testing.assert_close(a, b.detach(), msg=f"rank {rank} matrix {i}")
            assert torch.equal(a, ranks[0]["params"][i])  # the ranks' weights agree bit for bit
        # every rank holds every momentum buffer, as torch.optim.Muon's state dict: the main process saves it
        assert got["state"]["state"].keys() == ref_state.keys()
        for i in ref_state:
            torch.testing.assert_close(
                got["state"]["state"][i]["momentum_buffer"], ref_state[i]["momentum_buffer"]
            )


@pytest.mark.parametrize("world, replicas", [(2, 1), (3, 1), (4, 2)])
def test_fsdp_muon_on_gloo_processes_equals_one_process_torch_muon(world, replicas, tmp_path):
    """FSDPMuon on row-sharded DTensors (FSDP2's layout; (4, 2): HSDP, 2 replica groups of 2 shards)
    equals torch.optim.Muon on the whole matrices bit for bit: momentum over several steps, Nesterov,
    weight decay; the optimizer state checkpoints gather is torch's, keyed by parameter name."""
    import muon_worker

    args = (world, replicas, str(tmp_path / "init"), str(tmp_path))
    torch.multiprocessing.start_processes(muon_worker.run_fsdp, args=args, nprocs=world, start_method="fork")
    ref, ref_state = torch_muon_reference()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    shards = world // replicas
    rows = {2: [(10, 1)] * 2, 3: [(7, 1), (7, 1), (6, 0)]}[shards]
    owner = ranks[0]["owner"]
    assert sorted(set(owner)) == list(range(shards))  # split over a replica group's shard ranks
    for rank, got in enumerate(ranks):
        mine = [shape for shape, r in zip(muon_worker.SHAPES, owner, strict=True) if r == rank % shards]
        # whole matrices, on their owner only (each replica group repeats its own), once a step
        assert sorted(got["calls"]) == sorted(mine * muon_worker.STEPS), rank
        for i, (a, b) in enumerate(zip(got["params"], ref, strict=True)):
            assert torch.equal(a, b.detach()), f"rank {rank} matrix {i}"
        # FSDP2's split of the (20, 12) and (2, 12) matrices: uneven over 3, and an empty shard
        assert (got["rows"][6], got["rows"][7]) == rows[rank % shards], rank
    # the state a checkpoint gathers onto the main process: torch's momentum, whole, keyed by name
    state = ranks[0]["state"]["state"]
    assert set(state) == {f"mats.{i}" for i in range(len(ref))}
    for i in ref_state:
        assert torch.equal(state[f"mats.{i}"]["momentum_buffer"], ref_state[i]["momentum_buffer"]), i


def test_muon_step_parts_project_to_more_ranks():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(32, 16), (16, 16), (16, 48), (8, 8)]]
    opt = ShardedMuon(params, ONE, lr=0.02)
    for p in params:
        p.grad = torch.randn_like(p)
    parts = muon_step_parts(opt, repeats=1)
    assert None not in parts["ns_s"] and parts["row_bytes"] == 2 * sum(p.numel() for p in params)
    one = project_muon_step(parts, 1, gather_gbps=100.0)
    assert one["ns_s"] == pytest.approx(sum(parts["ns_s"])) and one["gather_s"] == 0.0
    two = project_muon_step(parts, 2, gather_gbps=100.0)
    owner = assign_shares(parts["shapes"], 2)
    assert two["ns_s"] == max(
        sum(t for t, r in zip(parts["ns_s"], owner, strict=True) if r == k) for k in range(2)
    )
    widest = max(sum(p.numel() for p, r in zip(params, owner, strict=True) if r == k) for k in range(2))
    assert two["gather_s"] == pytest.approx(2 * widest / 100e9)
