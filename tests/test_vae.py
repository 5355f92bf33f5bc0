"""The Wan2.1 VAE against the reference's outputs, its checkpoint layout, cancellation and tiled decoding."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from turbo_repl.models.registry import get_model
from turbo_repl.models.tiny import deterministic_init, seed_for
from turbo_repl.models.vae import CausalConv3d, Resample, WanVAE, _upsample_conv

STREAM = Path(__file__).parent / "data" / "vae_stream.safetensors"


def rel_max(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def rel_l2(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    meta = json.loads((fixtures_dir / "vae.json").read_text())
    weights = load_file(str(fixtures_dir / meta["files"]["weights"]["file"]))
    io = load_file(str(fixtures_dir / meta["files"]["io"]["file"]))
    return meta, weights, io


def fixture_vae(fixture, dtype=torch.float32):
    meta, weights, _ = fixture
    vae = WanVAE(**meta["constructor"]["kwargs"]).eval()
    vae.load_state_dict(weights, strict=True)
    return vae.to(dtype)


@pytest.fixture(scope="module")
def tiny_vae():
    return deterministic_init(WanVAE(**get_model("tiny").vae.arch), seed_for("test/vae")).eval()


def test_matches_reference_float32(fixture):
    meta, _, io = fixture
    vae = fixture_vae(fixture)
    out = {"latent": vae.encode(io["video"]), "latent_raw_mu": vae.encode(io["video"], normalize=False),
           "recon": vae.decode(io["latent"])}
    for name in meta["outputs"]:
        assert out[name].shape == io[name].shape, name
        assert rel_max(out[name], io[name]) <= meta["tolerance"]["threshold"], name
        assert rel_l2(out[name], io[name]) <= 1e-5, name


def test_latent_statistics_are_the_reference_constants(fixture):
    _, _, io = fixture
    vae = fixture_vae(fixture)
    mean, inv_std = vae._stats(torch.zeros(1))
    assert torch.allclose(mean.flatten(), io["latents_mean"])
    assert torch.allclose(1 / inv_std.flatten(), io["latents_std"])
    assert not any("mean" in k or "std" in k for k in vae.state_dict())


def test_matches_reference_over_many_chunks(fixture):
    """Four latent frames: the caches after the first chunk and after the upsamplers' first-frame case."""
    ref = load_file(str(STREAM))
    vae = fixture_vae(fixture)
    assert rel_max(vae.encode(ref["video"]), ref["latent"]) <= 1e-4
    assert rel_max(vae.decode(ref["latent_in"]), ref["recon"]) <= 1e-4
    # and it is causal: decoding a prefix of the latent gives a prefix of the video
    head = vae.decode(ref["latent_in"][:, :, :2])
    assert rel_max(head, ref["recon"][:, :, :5]) <= 1e-4


def test_bfloat16_is_close(fixture):
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per operation) through ~30 layers: the reference run
    # in bf16 (as TurboDiffusion runs it) lands 1.9e-2 rel-L2 / 3.5e-2 max from its own float32 output on a clip
    # like this one, and this implementation at the same distance.
    meta, _, io = fixture
    vae = fixture_vae(fixture, torch.bfloat16)
    latent = vae.encode(io["video"])
    recon = vae.decode(io["latent"])
    assert latent.dtype == recon.dtype == torch.float32   # returned in the caller's dtype
    assert rel_l2(latent, io["latent"]) <= 2e-2 and rel_max(latent, io["latent"]) <= 5e-2
    assert rel_l2(recon, io["recon"]) <= 4e-2 and rel_max(recon, io["recon"]) <= 1e-1


def test_real_size_keys_are_the_checkpoint_keys(fixture):
    meta, _, _ = fixture
    with torch.device("meta"):
        vae = WanVAE(**meta["constructor"]["real"])
    keys = [f"{k} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for k, t in vae.state_dict().items()]
    assert len(keys) == 194
    assert keys == meta["real_vae_keys (dim 96, meta device)"]
    assert sum(t.numel() for t in vae.state_dict().values()) == 126_892_531


def test_reference_constructor_spellings():
    a = WanVAE(dim=4, temperal_downsample=[False, True, False])
    b = WanVAE(dim=4, temporal_downsample=[False, True, False])
    assert a.time_stride == b.time_stride == 2


@pytest.mark.parametrize("frames, size", [(7, (16, 16)), (0, (16, 16)), (5, (16, 20))])
def test_bad_video_sizes_are_refused_clearly(tiny_vae, frames, size):
    with pytest.raises(ValueError, match="frames must be 4k\\+1|multiples of 8"):
        tiny_vae.encode(torch.zeros(1, 3, frames, *size))


def _streams_empty(vae):
    return all(m.past is None for m in vae.modules() if isinstance(m, CausalConv3d)) and \
        all(not m.started and m.last is None for m in vae.modules() if isinstance(m, Resample))


def test_cancelled_decode_leaves_the_vae_usable(tiny_vae):
    z = torch.randn(1, 16, 4, 2, 3, generator=torch.Generator().manual_seed(1))
    fresh = tiny_vae.decode(z)
    seen = []

    def cancel_after_two(done, total):
        seen.append((done, total))
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_vae.decode(z, on_chunk=cancel_after_two)
    assert seen == [(1, 4), (2, 4)]
    assert _streams_empty(tiny_vae)   # no frames of the cancelled clip are held
    assert torch.equal(tiny_vae.decode(z), fresh)


def test_decode_reports_every_chunk(tiny_vae):
    seen = []
    tiny_vae.decode(torch.randn(1, 16, 3, 2, 4), on_chunk=lambda d, t: seen.append((d, t)), tile=(2, 2),
                    tile_overlap=0)
    assert seen == [(d, 6) for d in range(1, 7)]   # two tiles x three latent frames


def test_tiled_decode_is_exact_with_one_tile(tiny_vae):
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(tiny_vae.decode(z, tile=(4, 6)), tiny_vae.decode(z))
    assert torch.equal(tiny_vae.decode(z, tile=(64, 64)), tiny_vae.decode(z))


# How far a latent pixel's influence reaches in the tiled (upsampling) stages of the tiny VAE, in latent pixels:
# 2 residual blocks (4 3x3 convs) at latent resolution, then per x2 stage one conv + 4 convs (+ the head's at
# the last): 4 + 5/2 + 5/4 + 6/8 < 9. Each tile ignores the quarter of the overlap nearest its edge, so an
# overlap of 40 (a margin of 10 > 9) must reproduce the untiled decode up to float rounding.
REACH = 9


@pytest.mark.parametrize("axis", ["width", "height"])
def test_tiled_decode_equals_untiled_when_overlap_exceeds_the_reach(tiny_vae, axis):
    z = torch.randn(1, 16, 2, 4, 72, generator=torch.Generator().manual_seed(3))
    tile = (4, 56)
    if axis == "height":
        z, tile = z.transpose(-1, -2).contiguous(), tile[::-1]
    full = tiny_vae.decode(z)
    tiled = tiny_vae.decode(z, tile=tile, tile_overlap=4 * (REACH + 1))
    assert rel_max(tiled, full) <= 1e-5


def test_tiled_decode_differs_only_near_the_seam(tiny_vae):
    z = torch.randn(1, 16, 2, 4, 72, generator=torch.Generator().manual_seed(4))
    full = tiny_vae.decode(z)
    tiled = tiny_vae.decode(z, tile=(4, 40), tile_overlap=8)   # tiles [0, 40) and [32, 72): seam at 36
    err = (tiled - full).abs().amax(dim=(0, 1, 2, 3)) / full.abs().max()
    cols = torch.arange(72 * 8) / 8
    far = (cols - 36).abs() > REACH + 8 / 2
    assert err[far].max() <= 1e-5
    assert err.max() > 1e-5   # a small overlap is not exact: this test can see the seam
    assert rel_l2(tiled, full) <= 2e-2


@pytest.mark.parametrize("size", [(5, 7), (1, 4)])
def test_upsample_conv_is_nearest_upsampling_then_the_conv(size):
    """The decoder's x2 upsampling runs as one 2x2 conv per output phase; the reference upsamples, then convolves."""
    g = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(6, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(3, generator=g))
        x = torch.randn(2, 6, 3, *size, generator=g)
        frames = x.transpose(1, 2).flatten(0, 1)
        want = conv(torch.nn.functional.interpolate(frames, scale_factor=2.0, mode="nearest-exact"))
        got = _upsample_conv(x.contiguous(memory_format=torch.channels_last_3d), conv)
    assert rel_max(got.transpose(1, 2).flatten(0, 1), want) <= 1e-6


def test_tiny_config_round_trip_shapes(tiny_vae):
    video = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    latent = tiny_vae.encode(video)
    assert latent.shape == (2, 16, 3, 2, 3)
    out = tiny_vae.decode(latent)
    assert out.shape == video.shape and torch.isfinite(out).all()


def test_decode_hands_out_its_frames_in_order_as_it_makes_them(tiny_vae):
    z = torch.randn(2, 16, 3, 2, 4, generator=torch.Generator().manual_seed(4))
    chunks = []
    video = tiny_vae.decode(z, on_frames=lambda frames: chunks.append(frames.clone()))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]        # the first latent frame makes one video frame
    assert torch.equal(torch.cat(chunks, dim=2), video)
