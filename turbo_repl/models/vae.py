"""The Wan2.1 video VAE: 4x temporal and 8x spatial compression into 16 latent channels.

State-dict keys are the reference's (`WanVAE_` in Wan `modules/vae.py` and TurboDiffusion
`rcm/tokenizers/wan2pt1.py`), so `Wan2.1_VAE.pth` loads without renaming.

Video is processed causally in time, a chunk at a time: encode takes frame 0 alone and then chunks of
`temporal_window` frames; decode runs its latent-resolution trunk over all latent frames at once (every step in
it is causal, so this equals streaming them) and the upsampling one latent frame at a time. Every causal
convolution keeps the last frames of its input between chunks (its `past`), which replace its zero padding in
time; this gives the same result as the reference's feature-cache list, without the index bookkeeping. The first
chunk is special in the temporal resamplers, exactly as in the reference:
  * downsample: the first chunk skips the stride-2 time conv (its frame passes through) and is remembered;
    later chunks prepend the last remembered frame and apply it;
  * upsample: the first latent frame skips the time conv (it yields one frame); from the second on, the time
    conv runs causally over the frames that followed the first, with zeros before them (the reference's "Rep").

Speed (the steps are the reference's, regrouped): activations are channels-last (NDHWC), which cuDNN's convolutions
want and which makes the channel norm a contiguous reduction. Each RMS norm + SiLU is one pass (`vae_ops`) that
writes straight into the next causal conv's time-padded input buffer, and conv biases are added in passes that
happen anyway (the next norm, the residual add, the rearrangement after the upsampling convs). The x2 nearest
upsampling and its 3x3 conv run as one 2x2 conv per output phase on the small frames.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from turbo_kernels.vae_ops import add_bias, rms_norm_silu

# Per-channel statistics of Wan2.1 latents: latent = (mu - mean) / std. Constants of the model, not weights.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

CACHE_T = 2   # frames a causal conv remembers between chunks (its temporal kernel is at most 3)
CHANNELS_LAST = torch.channels_last_3d   # the layout inside the network: norms reduce over contiguous channels


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B,C,T,H,W] -> [B*T,C,H,W]: a view for a channels-last video, with the strides that the convolutions
    recognise as channels-last (reshape would give an odd stride to a batch of one)."""
    b, c, t, h, w = x.shape
    if t == 1:
        return x[:, :, 0]
    if b == 1:
        return x[0].transpose(0, 1)
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _video(y: torch.Tensor, b: int) -> torch.Tensor:
    """[B*T,C,H,W] -> [B,C,T,H,W]; channels-last frames give a channels-last video (a view)."""
    return y.unflatten(0, (b, -1)).transpose(1, 2)


def conv_video(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1, 1),
               padding=(0, 0, 0)) -> torch.Tensor:
    """conv3d of [B,C,T,H,W] with no padding in time. Kernels one frame deep run as conv2d over the frames; on
    the CPU deeper ones too, one conv2d per temporal tap, summed: oneDNN's conv2d beats its conv3d fallback
    (im2col) by 10x at the tiny model's few channels. On a GPU, cuDNN's conv3d."""
    kt, st = weight.shape[2], stride[0]
    b = x.shape[0]
    if kt == 1 and st == 1:
        return _video(F.conv2d(_frames(x), weight[:, :, 0], bias, stride[1:], padding[1:]), b)
    if x.is_cuda:
        return F.conv3d(x, weight, bias, stride, padding)
    frames = x.transpose(1, 2)
    t_out = (x.shape[2] - kt) // st + 1
    out = None
    for k in range(kt):
        taps = frames[:, k:k + st * (t_out - 1) + 1:st].reshape(b * t_out, *frames.shape[2:])
        y = F.conv2d(taps, weight[:, :, k], bias if k == 0 else None, stride[1:], padding[1:])
        out = y if out is None else out.add_(y)
    return _video(out, b)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time at the front only. Streams: frames of earlier chunks replace the zero padding."""

    def __init__(self, in_dim: int, out_dim: int, kernel, stride=1, padding=0):
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt
        assert self.time_pad in (0, CACHE_T)
        self.past: torch.Tensor | None = None   # the last `time_pad` frames of the input (zeros before the first)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None, norm_bias: torch.Tensor | None = None,
                bias: bool = True) -> torch.Tensor:
        """Convolve the frames x [B,C,T,H,W] that follow those seen before. With `norm`, the input is
        silu(norm(x + norm_bias)), computed straight into the convolution's time-padded buffer; `bias=False`
        leaves this conv's bias to the caller (to add in its next pass)."""
        p = self.time_pad
        if p or norm is not None:
            b, c, t, h, w = x.shape
            buf = torch.empty((b, c, p + t, h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
            if p:
                buf[:, :, :p] = 0 if self.past is None else self.past
            if norm is None:
                buf[:, :, p:] = x
            else:
                norm(x, bias=norm_bias, silu=True, out=buf[:, :, p:])
            if p:
                self.past = buf[:, :, t:].clone()
            x = buf
        return conv_video(x, self.weight, self.bias if bias else None, self.stride, self.padding)

    def reset(self) -> None:
        self.past = None


class RMSNorm(nn.Module):
    """`normalize(x over channels) * sqrt(C) * gamma`; gamma is [C,1,1,1] for video, [C,1,1] for images."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """With `bias`, of x + bias; with `silu`, followed by SiLU; with `out`, written there (see vae_ops)."""
        return rms_norm_silu(x, self.gamma, bias, silu=silu, out=out)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        # indices matter: they are the checkpoint's key names (residual.0/2/3/6)
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the Sequential's steps, fused: norm + SiLU into each conv's input pass, conv1's bias into norm2's, the
        # biases of conv2 and the shortcut into the residual add (dropout: the VAE only runs in eval mode)
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv2(conv1(x, norm1, bias=False), norm2, norm_bias=conv1.bias, bias=False)
        if isinstance(self.shortcut, CausalConv3d):
            return add_bias(h, conv2.bias + self.shortcut.bias, self.shortcut(x, bias=False))
        return add_bias(h, conv2.bias, x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        pixels = self.norm(x).permute(0, 2, 3, 4, 1)                                     # [b, t, h, w, c]
        qkv = F.linear(pixels, self.to_qkv.weight.flatten(1), self.to_qkv.bias).reshape(b * t, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)
        step = max(1, 2 ** 28 // (h * w) ** 2)   # frames per call: bounds the scores if SDPA materialises them
        y = torch.cat([F.scaled_dot_product_attention(q[i:i + step], k[i:i + step], v[i:i + step])
                       for i in range(0, b * t, step)])                                # [bt, 1, hw, c]
        y = F.linear(y, self.proj.weight.flatten(1), self.proj.bias).reshape(b, t, h, w, c)
        return x + y.permute(0, 4, 1, 2, 3)


def _upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest-exact x2 upsample of every frame), conv 3x3 with padding 1, without the upsampled frames.

    Output pixel (2i+a, 2j+c) sees input rows i-1+a, i+a (and columns likewise): the 3x3 kernel folds into one
    2x2 kernel per phase (a, c), 2.25x fewer products. One conv2d (padding 1) computes the four phases as
    output channel groups on an (H+1)x(W+1) grid; the phase (a, c) pixel (i, j) is grid point (i+a, j+c).
    """
    def fold(k, dim):   # 3 taps along dim -> phase 0's 2 taps (t0, t1+t2) and phase 1's (t0+t1, t2)
        t0, t1, t2 = k.unbind(dim)
        return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)

    b, _, t, h, w = x.shape
    kernel = torch.cat([k for rows in fold(conv.weight.float(), 2) for k in fold(rows, 3)])   # phase 2a+c
    grid = F.conv2d(_frames(x), kernel.to(x.dtype), None, padding=1)
    grid = grid.permute(0, 2, 3, 1).contiguous()                                      # [bt, h+1, w+1, 4*o]
    o = conv.weight.shape[0]
    sn, sh, sw, _ = grid.stride()
    phases = grid.as_strided((b * t, h, 2, w, 2, o), (sn, sh, sh + 2 * o, sw, sw + o, 1))
    out = torch.add(phases, conv.bias, out=grid.new_empty(phases.shape))             # gather + bias: one pass
    return _video(out.view(b * t, 2 * h, 2 * w, o).permute(0, 3, 1, 2), b)


def _time_pairs(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y [B, 2C, T, H, W] + bias, whose channel halves are two successive frames -> [B, C, 2T, H, W],
    channels-last."""
    b, c2, t, h, w = y.shape
    c = c2 // 2
    frames = y.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5)   # [b, t, 2, h, w, c]
    out = torch.add(frames, bias.view(2, 1, 1, c), out=y.new_empty(frames.shape))      # rearrange + bias: one pass
    return out.view(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)


class Resample(nn.Module):
    """Spatial x2 up/down sampling per frame, plus (the "3d" modes) a causal x2 in time."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        # `resample.1` is the checkpoint's name of the spatial conv; index 0 is its parameter-free first step
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.started = False
        self.last: torch.Tensor | None = None   # downsample3d: the last frame of the previous chunk

    def reset(self) -> None:
        self.started, self.last = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "upsample3d":
            if self.started:
                x = _time_pairs(self.time_conv(x, bias=False), self.time_conv.bias)
            self.started = True
        if self.mode.startswith("upsample"):
            return _upsample_conv(x, self.resample[1])
        conv = self.resample[1]
        frames = F.pad(_frames(x), (0, 1, 0, 1)).contiguous(memory_format=torch.channels_last)
        x = _video(F.conv2d(frames, conv.weight, conv.bias, stride=2), x.shape[0])
        if self.mode == "downsample3d":
            if self.started:
                last = x[:, :, -1:].clone()
                x = self.time_conv(torch.cat([self.last, x], dim=2))
                self.last = last
            else:
                self.last = x[:, :, -1:].clone()
            self.started = True
        return x


def _head(head: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    norm, _, conv = head   # RMSNorm, SiLU, conv: the first two fused into the conv's input pass
    return conv(x, norm)


class Encoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample, dropout):
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, dropout))
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _head(self.head, self.middle(self.downsamples(self.conv1(x))))


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_upsample, dropout):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2   # the previous stage's upsample halved the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        """The latent-resolution part, whose attention sees the whole frame: never tiled."""
        return self.middle(self.conv1(z))

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Upsampling to pixels: convolutions only, so it can be tiled."""
        return _head(self.head, self.upsamples(x))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.expand(self.trunk(z))


CUDNN_AUTOTUNE = True   # cuDNN times its algorithms once per conv shape (a decode repeats its shapes every frame)


@contextlib.contextmanager
def _cudnn_autotune():
    """cuDNN's algorithm choice as CUDNN_AUTOTUNE says, during a call; the global setting is restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = CUDNN_AUTOTUNE
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _reset_streams(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (CausalConv3d, Resample)):
            m.reset()


class WanVAE(nn.Module):
    """Wan2.1 VAE. `encode(video) -> normalised latent`, `decode(latent) -> video`, both in [-1, 1] pixel space.

    Runs in the dtype of its weights (float32 for parity, bf16 as TurboDiffusion runs it) and returns the
    dtype it was given.
    """

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_scales: Sequence[float] = (),
                 temperal_downsample: Sequence[bool] = (False, True, True), dropout: float = 0.0,
                 temporal_window: int = 4, *, temporal_downsample: Sequence[bool] | None = None):
        super().__init__()
        if temporal_downsample is not None:   # our spelling; the reference's is `temperal_downsample`
            temperal_downsample = temporal_downsample
        if z_dim != len(LATENT_MEAN):
            raise ValueError(f"the Wan2.1 VAE has {len(LATENT_MEAN)} latent channels (z_dim), not {z_dim}")
        self.z_dim = z_dim
        self.time_stride = 2 ** sum(bool(t) for t in temperal_downsample)
        self.space_stride = 2 ** (len(dim_mult) - 1)
        if temporal_window % self.time_stride:
            raise ValueError(f"temporal_window {temporal_window} must be a multiple of the temporal "
                             f"compression {self.time_stride}")
        self.temporal_window = temporal_window
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales, temperal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample[::-1],
                                 dropout)

    # ------------------------------------------------------------------------------------------ shapes

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, H, W) of the latent of a video; raises ValueError for sizes the VAE cannot take."""
        s, t = self.space_stride, self.time_stride
        if frames < 1 or (frames - 1) % t:
            raise ValueError(f"frames must be {t}k+1 (1, {1 + t}, {1 + 2 * t}, …), not {frames}")
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s}, not {height}x{width}")
        return 1 + (frames - 1) // t, height // s, width // s

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Made in the compute dtype from the Python constants, as the reference does (1/std in that dtype).
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=like.dtype, device=like.device).view(shape)
        inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=like.dtype, device=like.device).view(shape)
        return mean, inv_std

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    # ------------------------------------------------------------------------------------------ encode

    @torch.no_grad()
    @_cudnn_autotune()
    def encode(self, video: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """video [B,3,F,H,W] in [-1,1], F = 4k+1 -> latent [B,16,1+(F-1)/4,H/8,W/8] ((mu-mean)/std, or raw mu)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], not {list(video.shape)}")
        self.latent_shape(*video.shape[2:])
        x = video.to(self.dtype).contiguous(memory_format=CHANNELS_LAST)
        frames, w = x.shape[2], self.temporal_window
        bounds = [(0, 1)] + [(s, min(s + w, frames)) for s in range(1, frames, w)]
        _reset_streams(self.encoder)
        try:
            out = torch.cat([self.encoder(x[:, :, a:b]) for a, b in bounds], dim=2)
        finally:
            _reset_streams(self.encoder)
        mu = self.conv1(out)[:, : self.z_dim]
        if normalize:
            mean, inv_std = self._stats(mu)
            mu = (mu - mean) * inv_std
        return mu.to(video.dtype, memory_format=torch.contiguous_format)

    # ------------------------------------------------------------------------------------------ decode

    @torch.no_grad()
    @_cudnn_autotune()
    def decode(self, latent: torch.Tensor, on_chunk: Callable[[int, int], None] | None = None,
               tile: tuple[int, int] | None = None, tile_overlap: int = 8,
               on_frames: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """latent [B,16,T,h,w] (normalised) -> video [B,3,1+4(T-1),8h,8w], roughly in [-1,1].

        `on_chunk(done, total)` is called after every decoded latent frame (of every tile); it may raise to
        cancel, and the VAE stays usable. `tile=(th, tw)` decodes the upsampling stages in spatial tiles of
        that latent size, overlapping by at least `tile_overlap` latent pixels: far less memory for big
        frames. The latent-resolution trunk (with its whole-frame attention) is never tiled, so tiles differ
        from the untiled result only through the convolutions' limited view across the seams: the middle
        half of each overlap is cross-faded linearly and the quarter nearest each tile edge is not used.
        `tile=None` (or a tile that covers the latent) is exact. Untiled, `on_frames(video)` gets each latent
        frame's video frames [B, 3, F, H, W] as soon as they are decoded, in order.
        """
        if latent.dim() != 5 or latent.shape[1] != self.z_dim:
            raise ValueError(f"latent must be [B, {self.z_dim}, T, H, W], not {list(latent.shape)}")
        z = latent.to(self.dtype)
        mean, inv_std = self._stats(z)
        z = self.conv2((z / inv_std + mean).contiguous(memory_format=CHANNELS_LAST))
        b, _, t, h, w = z.shape
        s = self.space_stride
        rows = _tile_spans(h, tile[0], tile_overlap) if tile else [(0, h)]
        cols = _tile_spans(w, tile[1], tile_overlap) if tile else [(0, w)]
        out_shape = (b, 3, 1 + self.time_stride * (t - 1), h * s, w * s)
        _reset_streams(self.decoder)
        try:
            # every step of the trunk is causal in time and per frame otherwise: all latent frames at once give
            # what streaming them one by one gives
            feats = self.decoder.trunk(z).split(1, dim=2)
            if len(rows) == len(cols) == 1:
                out = z.new_empty(out_shape)
                self._expand_into(out, feats, on_chunk, 0, t, on_frames)
                return out.to(latent.dtype)
            wy, wx = _blend_weights(rows, s, z.device), _blend_weights(cols, s, z.device)
            acc = torch.zeros(out_shape, device=z.device, dtype=torch.float32)
            for i, (y0, y1) in enumerate(rows):
                for j, (x0, x1) in enumerate(cols):
                    piece = z.new_empty(*out_shape[:3], (y1 - y0) * s, (x1 - x0) * s)
                    self._expand_into(piece, [f[..., y0:y1, x0:x1] for f in feats], on_chunk,
                                      (i * len(cols) + j) * t, len(rows) * len(cols) * t)
                    acc[..., y0 * s:y1 * s, x0 * s:x1 * s].addcmul_(piece, wy[i][:, None] * wx[j])
            return acc.to(latent.dtype)
        finally:
            _reset_streams(self.decoder)

    def _expand_into(self, out: torch.Tensor, feats: list[torch.Tensor], on_chunk, done: int, total: int,
                     on_frames=None) -> None:
        """Upsample the trunk features of every latent frame in turn, writing the frames into `out`."""
        _reset_streams(self.decoder.upsamples)
        _reset_streams(self.decoder.head)
        f = 0
        for i, feat in enumerate(feats):
            y = self.decoder.expand(feat)
            out[:, :, f:f + y.shape[2]] = y
            if on_frames is not None:
                on_frames(out[:, :, f:f + y.shape[2]])
            f += y.shape[2]
            if on_chunk is not None:
                on_chunk(done + i + 1, total)


def _tile_spans(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Start/end of tiles of `size` covering [0, n), overlapping by at least `overlap`, spread evenly."""
    if size >= n:
        return [(0, n)]
    if not 0 <= overlap < size:
        raise ValueError(f"tile overlap must be at least 0 and smaller than the tile ({size}), not {overlap}")
    count = math.ceil((n - overlap) / (size - overlap))
    starts = [round(k * (n - size) / (count - 1)) for k in range(count)]
    return [(a, a + size) for a in starts]


def _blend_weights(spans: list[tuple[int, int]], s: int, device) -> list[torch.Tensor]:
    """Per tile, 1-D weights over its pixels (latent pixel = s pixels) that sum to 1 across tiles.

    Between two overlapping tiles the weight crosses linearly over the middle half of the overlap; the
    quarter of the overlap nearest a tile's own edge, where it lacked context, gets weight 0.
    """
    def ramp(pos, a, b, rising):   # overlap [a, b) in latent pixels
        lo, hi = (a + (b - a) / 4) * s, (b - (b - a) / 4) * s
        if hi <= lo:
            return (pos >= lo) if rising else (pos < lo)
        w = ((pos - lo) / (hi - lo)).clamp(0, 1)
        return w if rising else 1 - w

    raw = []
    for k, (a, b) in enumerate(spans):
        pos = torch.arange(a * s, b * s, dtype=torch.float64) + 0.5
        w = torch.ones_like(pos)
        if k > 0:
            w = w * ramp(pos, a, spans[k - 1][1], rising=True)
        if k + 1 < len(spans):
            w = w * ramp(pos, spans[k + 1][0], b, rising=False)
        raw.append(w)
    total = torch.zeros(spans[-1][1] * s, dtype=torch.float64)
    for (a, b), w in zip(spans, raw):
        total[a * s:b * s] += w
    return [(w / total[a * s:b * s]).to(device=device, dtype=torch.float32) for (a, b), w in zip(spans, raw)]
