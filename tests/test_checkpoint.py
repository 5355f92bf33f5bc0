"""Checkpoint reading and strict loading: every reference format round-trips; every refusal says why."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from turbo_repl.models.attention import configure_attention
from turbo_repl.models.checkpoint import (
    CheckpointError, CheckpointMismatch, dit_from_checkpoint, fingerprint, load_into, read_state_dict, tiny_dit,
)
from turbo_repl.models.dit import WanDiT
from turbo_repl.models.registry import dit_arch

ARCH = dit_arch("tiny-t2v")


@pytest.fixture(scope="module")
def tiny():
    model = tiny_dit(ARCH, seed=3)          # sparse: carries proj_l like the released checkpoints
    configure_attention(model, "original", 0.1)
    return model


@pytest.fixture(scope="module")
def tiny_out(tiny):
    return run(tiny)


@torch.no_grad()
def run(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 5, ARCH["text_dim"], generator=g)
    return model(x, torch.tensor([[700.0]]), ctx)


def load(path, **kw):
    model = dit_from_checkpoint(ARCH, path, device="cpu", dtype=None, name="tiny", **kw)
    configure_attention(model, "original", 0.1)
    return model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- formats that load

def save_safetensors(sd, d):
    save_file(sd, d / "dit.safetensors")
    return d / "dit.safetensors"


def save_pth(sd, d):
    torch.save(sd, d / "dit.pth")
    return d / "dit.pth"


def save_pth_legacy(sd, d):
    torch.save(sd, d / "dit.pt", _use_new_zipfile_serialization=False)   # cannot be memory-mapped
    return d / "dit.pt"


def save_wrapped_net_prefix(sd, d):
    torch.save({"state_dict": {f"net.{k}": v for k, v in sd.items()}, "iteration": 5000}, d / "dit.pth")
    return d / "dit.pth"


def save_wan_shards(sd, d):
    """Original Wan layout: Conv3d patch embedding, two shards and a `weight_map` index."""
    sd = dict(sd)
    w = sd["patch_embedding.weight"]
    sd["patch_embedding.weight"] = w.reshape(w.shape[0], 16, 1, 2, 2).contiguous()
    keys = sorted(sd)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        save_file({k: sd[k] for k in part}, d / name)
    weight_map = {k: names[i] for i, part in enumerate(halves) for k in part}
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return d


def save_wan_index(sd, d):
    return save_wan_shards(sd, d) / "diffusion_pytorch_model.safetensors.index.json"


@pytest.mark.parametrize("save", [save_safetensors, save_pth, save_pth_legacy, save_wrapped_net_prefix,
                                  save_wan_shards, save_wan_index])
def test_every_format_round_trips_bit_identically(tiny, tiny_out, tmp_path, save):
    path = save(state(tiny), tmp_path)
    loaded = load(path)
    assert loaded.blocks[0].self_attn.attn_op.local_attn.proj_l is not None   # SLA keys were recognised
    assert torch.equal(run(loaded), tiny_out)


def test_conv3d_patch_embedding_of_the_reference_fixture(fixtures_dir, tmp_path):
    meta = json.loads((fixtures_dir / "dit_t2v.json").read_text())
    sd = read_state_dict(fixtures_dir / meta["files"]["weights"]["file"])
    io = read_state_dict(fixtures_dir / meta["files"]["io"]["file"])
    dim = meta["constructor"]["kwargs"]["dim"]
    sd["patch_embedding.weight"] = sd["patch_embedding.weight"].reshape(dim, 16, 1, 2, 2).contiguous()
    save_file(sd, tmp_path / "wan.safetensors")
    model = dit_from_checkpoint(meta["constructor"]["kwargs"], tmp_path / "wan.safetensors", device="cpu",
                                dtype=torch.float32)
    with torch.no_grad():
        out = model(io["x_B_C_T_H_W"], io["timesteps_B_T"], io["crossattn_emb"])
    ref = io["output"]
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= meta["tolerance"]["threshold"]


def test_place_casts_floats_but_keeps_norm_weights_float32(tiny, tmp_path):
    path = save_safetensors(state(tiny), tmp_path)
    kept = dit_from_checkpoint(ARCH, path, device="cpu", dtype=None)
    assert not any(p.requires_grad for p in kept.parameters())
    bf16 = dit_from_checkpoint(ARCH, path, device="cpu", dtype=torch.bfloat16)
    assert bf16.blocks[1].cross_attn.k.weight.dtype == torch.bfloat16
    assert bf16.blocks[1].self_attn.attn_op.local_attn.proj_l.weight.dtype == torch.bfloat16
    assert bf16.blocks[1].self_attn.norm_q.weight.dtype == torch.float32


def test_tiny_weights_are_deterministic():
    a, b, c = tiny_dit(ARCH, seed=1), tiny_dit(ARCH, seed=1), tiny_dit(ARCH, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.ffn.0.weight"], sc["blocks.0.ffn.0.weight"])


# ----------------------------------------------------------------------------- refusals

def meta_model(arch, sparse=False):
    with torch.device("meta"):
        return WanDiT(**dit_arch(arch), sparse_attention=sparse)


def test_missing_and_unexpected_keys_are_named(tiny, tmp_path):
    sd = state(tiny)
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.1.ffn.3.weight"] = torch.zeros(2)
    path = save_safetensors(sd, tmp_path)
    with pytest.raises(CheckpointMismatch) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith("tiny DiT: checkpoint ") and str(path) in msg
    assert "1 missing (blocks.1.ffn.2.bias)" in msg and "1 unexpected (blocks.1.ffn.3.weight)" in msg
    assert "\n" not in msg


def test_real_width_mismatch_names_the_right_model():
    small = meta_model("wan2.1-1.3b").state_dict()
    with pytest.raises(CheckpointMismatch) as e:
        load_into(meta_model("wan2.1-14b"), small, what="wan2.1-14b-720p DiT", path="TurboWan2.1-T2V-1.3B.pth")
    msg = str(e.value)
    assert msg.startswith("wan2.1-14b-720p DiT: checkpoint TurboWan2.1-T2V-1.3B.pth does not fit")
    assert "patch_embedding.weight [1536, 64] in file vs [5120, 64] in model" in msg
    assert "this checkpoint is wan2.1-1.3b (dim 1536, 30 blocks, 16 input channels): choose --model wan2.1-1.3b" in msg

    with pytest.raises(CheckpointMismatch, match="choose --model wan2.2-a14b-i2v"):
        load_into(meta_model("wan2.1-14b"), meta_model("wan2.2-a14b").state_dict(), what="DiT", path="high.pth")


def test_sla_and_dense_checkpoints_are_told_apart():
    with pytest.raises(CheckpointMismatch, match="this is an SLA checkpoint .* run it with attention sla"):
        load_into(meta_model("wan2.1-1.3b"), meta_model("wan2.1-1.3b", sparse=True).state_dict(), what="DiT",
                  path="x.pth")
    with pytest.raises(CheckpointMismatch, match="60 missing .*dense checkpoint .* attention original"):
        load_into(meta_model("wan2.1-1.3b", sparse=True), meta_model("wan2.1-1.3b").state_dict(), what="DiT",
                  path="x.pth")


def test_int8_checkpoint_into_float_model_asks_for_quant():
    sd = meta_model("wan2.1-1.3b").state_dict()
    for k in [k for k in sd if k.startswith("blocks.") and k.endswith(("q.weight", "ffn.0.weight"))]:
        sd[k.replace(".weight", ".int8_weight")] = torch.empty(sd.pop(k).shape, dtype=torch.int8, device="meta")
    with pytest.raises(CheckpointMismatch, match="int8 \\(-quant\\) checkpoint: load it with quant int8"):
        load_into(meta_model("wan2.1-1.3b"), sd, what="DiT", path="x-quant.pth")


def test_a_file_of_another_model_is_called_that(tmp_path):
    path = save_safetensors({"encoder.conv1.weight": torch.zeros(2, 2)}, tmp_path)
    with pytest.raises(CheckpointMismatch, match="none of its keys belong to this model: is it the right file"):
        load(path)


def test_truncated_files_are_refused(tiny, tmp_path):
    for save in (save_safetensors, save_pth):
        path = save(state(tiny), tmp_path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="probably truncated or corrupt — delete it and download it again") as e:
            read_state_dict(path)
        assert str(path) in str(e.value)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.modulation": torch.zeros(1), "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="never runs pickled code") as e:
        read_state_dict(path)
    assert "posix.mkdir" in str(e.value) or "nt.mkdir" in str(e.value)
    assert not marker.exists()
    # a plain pickle (not even torch's format) is treated the same way
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    assert not marker.exists()


def test_paths_that_hold_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*turbo-repl download"):
        read_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "high_noise_model").mkdir()
    save_file({"a": torch.zeros(1)}, tmp_path / "high_noise_model" / "shard.safetensors")
    with pytest.raises(CheckpointError, match="no .safetensors checkpoint .*subdirectories hold some: high_noise_model"):
        read_state_dict(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint format '.txt'"):
        read_state_dict(tmp_path / "notes.txt")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict \\(found list\\)"):
        read_state_dict(tmp_path / "list.pth")


def test_missing_shard_is_named(tiny, tmp_path):
    index = save_wan_index(state(tiny), tmp_path)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard diffusion_pytorch_model-00002-of-00002.safetensors, "
                                              "which is missing .*finish the download"):
        read_state_dict(index)


# ----------------------------------------------------------------------------- fingerprints

def test_fingerprint_is_stable_and_tells_files_apart(tmp_path):
    a = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(600_000, dtype=torch.float32)}, a)   # 2.4 MB: head, middle and tail
    fp = fingerprint(a)
    assert fp == fingerprint(a) and len(fp) == 16
    data = bytearray(a.read_bytes())
    data[-1] ^= 1
    a.write_bytes(bytes(data))
    assert fingerprint(a) != fp
    b = tmp_path / "b.safetensors"
    b.write_bytes(bytes(data))
    assert fingerprint(b) != fingerprint(a)                      # the name is part of it
    data[len(data) // 2] ^= 1                                    # documented blind spot: the middle
    a.write_bytes(bytes(data))
    assert fingerprint(a) == fingerprint(tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------- int8 (-quant) checkpoints

def quantize_like_turbodiffusion(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight and float32 scale per 128x128 tile: scale = amax/128, q = round(w*128/amax) saturated."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty((rows + 127) // 128, (cols + 127) // 128)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            amax = tile.abs().max().clamp_min(1e-8)
            scale[i, j] = amax / 128
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = torch.round(tile * (128 / amax)).clamp(-128, 127)
    return q, scale


def test_int8_checkpoint_loads_into_8bit_linears(fixtures_dir, tmp_path):
    pytest.importorskip("turbo_repl.models.linear")
    meta = json.loads((fixtures_dir / "dit_t2v.json").read_text())
    sd = read_state_dict(fixtures_dir / meta["files"]["weights"]["file"])
    io = read_state_dict(fixtures_dir / meta["files"]["io"]["file"])
    quantized = 0
    for key in [k for k in sd if k.startswith("blocks.") and k.endswith(".weight") and sd[k].dim() == 2]:
        prefix = key[: -len("weight")]
        sd[prefix + "int8_weight"], sd[prefix + "scale"] = quantize_like_turbodiffusion(sd.pop(key))
        quantized += 1
    assert quantized == 10   # q, k, v, o of both attentions, ffn.0, ffn.2
    save_file(sd, tmp_path / "dit-quant.safetensors")

    arch = meta["constructor"]["kwargs"]
    model = dit_from_checkpoint(arch, tmp_path / "dit-quant.safetensors", device="cpu", dtype=None)
    lin = model.blocks[0].ffn[0]
    assert lin.int8_weight.dtype == torch.int8 and lin.scale.dtype == torch.float32
    assert isinstance(model.patch_embedding, torch.nn.Linear)       # outside the blocks nothing is 8-bit
    with torch.no_grad():
        out = model(io["x_B_C_T_H_W"], io["timesteps_B_T"], io["crossattn_emb"])
    ref = io["output"]
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 5e-2

    bf16 = dit_from_checkpoint(arch, tmp_path / "dit-quant.safetensors", device="cpu", dtype=torch.bfloat16)
    lin = bf16.blocks[0].ffn[0]
    assert lin.int8_weight.dtype == torch.int8 and lin.scale.dtype == torch.float32
    assert lin.bias.dtype == torch.bfloat16


def test_place_keeps_fp8_weights_and_scales():
    linear = pytest.importorskip("turbo_repl.models.linear")
    model = linear.convert_linears(tiny_dit(ARCH, seed=4), "fp8")
    model.place("cpu", torch.bfloat16)
    lin = model.blocks[1].self_attn.o
    assert lin.fp8_weight.dtype == torch.float8_e4m3fn and lin.weight_scale.dtype == torch.float32
    assert lin.bias.dtype == torch.bfloat16 and model.patch_embedding.weight.dtype == torch.bfloat16
