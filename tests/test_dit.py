"""The Wan DiT against the reference's golden outputs (TurboDiffusion WanModel, float32, tiny configs)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from turbo_repl.models.dit import WanDiT
from turbo_repl.models.registry import dit_arch


def rel_max(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def rel_l2(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def load_fixture(fixtures_dir, name):
    meta = json.loads((fixtures_dir / f"{name}.json").read_text())
    weights = load_file(fixtures_dir / meta["files"]["weights"]["file"])
    io = load_file(fixtures_dir / meta["files"]["io"]["file"])
    model = WanDiT(**meta["constructor"]["kwargs"])
    model.load_state_dict(weights, strict=True)   # the reference's names, no renaming
    return meta, model.eval(), io


def inputs(io):
    return io["x_B_C_T_H_W"], io["timesteps_B_T"], io["crossattn_emb"], io.get("y_B_C_T_H_W")


@pytest.fixture(scope="module", params=["dit_t2v", "dit_i2v"])
def fixture(request, fixtures_dir):
    return load_fixture(fixtures_dir, request.param)


@torch.no_grad()
def test_float32_matches_reference(fixture):
    meta, model, io = fixture
    out = model(*inputs(io))
    assert out.dtype == torch.float32 and out.shape == io["output"].shape
    assert rel_max(out, io["output"]) <= meta["tolerance"]["threshold"]
    assert rel_l2(out, io["output"]) <= 1e-5


@torch.no_grad()
def test_bfloat16_close_to_float32(fixture):
    meta, model, io = fixture
    ref = model(*inputs(io))
    bf16 = WanDiT(**meta["constructor"]["kwargs"])
    bf16.load_state_dict(model.state_dict())
    bf16.place("cpu", torch.bfloat16)
    assert bf16.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert bf16.blocks[0].norm3.weight.dtype == torch.float32        # norms keep float32 weights
    x, t, ctx, y = inputs(io)
    # timesteps stay float32 here: rounding them to bf16 is the sampler's step, and moves t=750 to 752
    out = bf16(x.bfloat16(), t, ctx.bfloat16(), None if y is None else y.bfloat16())
    assert out.dtype == torch.float32                                 # the head runs in float32
    err = rel_max(out, ref)
    assert 1e-4 < err <= 3e-2, err                                    # really ran in bf16, and not far off


@torch.no_grad()
def test_batch_of_two_is_two_independent_samples(fixture):
    meta, model, io = fixture
    x, t, ctx, y = inputs(io)
    two = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
    out = model(two(x), torch.cat([t, t]).reshape(2), two(ctx), two(y))   # timesteps as [B] this time
    assert out.shape[0] == 2
    assert torch.equal(out[0], out[1])
    assert rel_max(out[:1], io["output"]) <= meta["tolerance"]["threshold"]

    # per-sample timesteps: each sample sees its own
    t2 = torch.cat([t, t * 0.5])
    mixed = model(two(x), t2, two(ctx), two(y))
    alone = model(x, t * 0.5, ctx, y)
    assert rel_max(mixed[1:], alone) <= 1e-5
    assert rel_max(mixed[:1], io["output"]) <= meta["tolerance"]["threshold"]


@torch.no_grad()
def test_rope_tables_are_made_once_per_grid(fixture):
    meta, model, io = fixture
    model._rope_cache.clear()
    model(*inputs(io))
    model(*inputs(io))
    assert len(model._rope_cache) == 1
    x, t, ctx, y = inputs(io)
    model(x[..., :4], t, ctx, None if y is None else y[..., :4])     # another grid, another table
    assert len(model._rope_cache) == 2


def test_wrong_channels_are_refused_with_the_fix(fixtures_dir):
    _, model, io = load_fixture(fixtures_dir, "dit_i2v")
    with pytest.raises(ValueError, match="36 input channels, got 16: pass the 20 conditioning channels y"):
        model(io["x_B_C_T_H_W"], io["timesteps_B_T"], io["crossattn_emb"])


# ----------------------------------------------------------------------------- real architectures, on meta

def template(fixtures_dir, name: str) -> dict[str, list[int]]:
    """Full key -> shape map of a real network, from the fixture sidecar's layout listing."""
    layouts = json.loads((fixtures_dir / "dit_t2v.json").read_text())["real_checkpoint_layouts (meta device)"]
    layout = layouts[name]

    def parse(line):
        key, rest = line.split(" ", 1)
        return key, json.loads(rest.rsplit(" ", 1)[0])

    keys = dict(parse(line) for line in layout["non_block_keys"])
    for line in layout["block_0_keys (blocks.N.* repeat this)"]:
        key, shape = parse(line)
        for i in range(layout["num_blocks"]):
            keys[key.replace("blocks.0.", f"blocks.{i}.", 1)] = shape
    assert len(keys) == layout["total_keys"]
    return keys


@pytest.mark.parametrize("arch,name,count", [
    ("wan2.1-1.3b", "Wan2.1-1.3B", 825), ("wan2.1-14b", "Wan2.1-14B", 1095), ("wan2.2-a14b", "Wan2.2-A14B", 1095),
])
def test_real_architectures_have_the_reference_keys_and_shapes(fixtures_dir, arch, name, count):
    with torch.device("meta"):
        model = WanDiT(**dit_arch(arch))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == count
    assert ours == template(fixtures_dir, name)


def test_sparse_attention_adds_only_proj_l_per_block():
    with torch.device("meta"):
        dense = WanDiT(**dit_arch("wan2.1-1.3b"))
        sparse = WanDiT(**dit_arch("wan2.1-1.3b"), sparse_attention=True)
    extra = set(sparse.state_dict()) - set(dense.state_dict())
    assert extra == {f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.{p}" for i in range(30)
                     for p in ("weight", "bias")}
    assert sparse.state_dict()["blocks.7.self_attn.attn_op.local_attn.proj_l.weight"].shape == (128, 128)
