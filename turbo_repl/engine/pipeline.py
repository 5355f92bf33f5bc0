"""Text-to-video and image-to-video: prompt -> umT5 -> rCM sampler over the DiT expert(s) -> VAE -> frames.

The pipeline holds loaded modules and knows nothing of files, settings tables or the REPL: it is handed plain
values (sizes, steps, seed) and a `checkpoint(stage, done, total)` callback that reports progress and may raise
to cancel between steps and VAE chunks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from turbo_repl.engine import sampler
from turbo_repl.engine.graphs import GraphedForward

Checkpoint = Callable[[str, int, int], None]
LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)          # time, height, width
PATCH_STRIDE = 16               # VAE stride x DiT patch: image sizes must be multiples of this
VAE_TILE = (34, 34)             # latent pixels per tile when whole frames do not fit in GPU memory


@dataclass(frozen=True)
class Job:
    """One generation, in the pipeline's terms."""

    prompt: str
    width: int
    height: int
    frames: int
    steps: int
    sigma_max: float
    ode: bool
    samples: int
    seed: int
    boundary: float = 0.9
    image: torch.Tensor | None = None   # I2V: preprocessed [3, height, width] in [-1, 1]


SHORT_PROMPT_WORDS = 8


def prompt_warnings(prompt: str) -> list[str]:
    """Advice, not errors: the distilled checkpoints were trained on long, detailed English prompts."""
    warnings = []
    words = prompt.split()
    if len(words) < SHORT_PROMPT_WORDS:
        warnings.append(f"short prompt ({len(words)} words): these models were trained on long, detailed prompts — "
                        "describe the subject, the scene, the motion, the camera and the style")
    letters = [c for c in prompt if c.isalpha()]
    if letters and sum(c.isascii() for c in letters) < 0.5 * len(letters):
        warnings.append("the prompt is mostly not in English: these models were trained on English prompts and may "
                        "follow others less well")
    return warnings


def latent_shape(job: Job) -> tuple[int, ...]:
    if (job.frames - 1) % VAE_STRIDE[0]:
        raise ValueError(f"frames must be 4k+1 (e.g. 17, 33, 81), not {job.frames}")
    if job.width % PATCH_STRIDE or job.height % PATCH_STRIDE:
        raise ValueError(f"width and height must be multiples of {PATCH_STRIDE}, not {job.width}x{job.height}")
    return (job.samples, LATENT_CHANNELS, 1 + (job.frames - 1) // VAE_STRIDE[0],
            job.height // VAE_STRIDE[1], job.width // VAE_STRIDE[2])


def adaptive_size(image_width: int, image_height: int, area: int) -> tuple[int, int]:
    """The reference's adaptive resolution: keep the table entry's area, follow the image's aspect ratio, round
    each side to a multiple of 16 (Python round on float64: halves go to even)."""
    aspect = image_height / image_width
    ideal_w, ideal_h = np.sqrt(area / aspect), np.sqrt(area * aspect)
    return (int(round(ideal_w / PATCH_STRIDE)) * PATCH_STRIDE, int(round(ideal_h / PATCH_STRIDE)) * PATCH_STRIDE)


def preprocess_image(rgb: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> [3, height, width] in [-1, 1]: stretched (no crop) with antialiased bilinear resizing,
    rounded back to 8 bits as the reference's uint8 image pipeline does, then scaled to [-1, 1]."""
    x = rgb.permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    return (x[0] / 255.0 - 0.5) / 0.5


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """VAE output [N, 3, F, H, W] in ~[-1, 1] -> uint8 [N, F, H, W, 3], rounding half up like the reference."""
    x = (1 + video.float().clamp(-1, 1)) / 2
    return (x * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


class Pipeline:
    def __init__(self, text_encoder, experts: list, vae, *, device, dtype: torch.dtype, task: str = "t2v",
                 park_idle_expert=False, cuda_graphs: bool = True, text_cache_size: int = 32):
        self.text_encoder, self.experts, self.vae = text_encoder, experts, vae
        self.device, self.dtype = torch.device(device), dtype
        self.is_i2v = task == "i2v"
        # With two experts that do not both fit on the GPU, the idle one waits in host memory.
        self.park_idle_expert = park_idle_expert
        self.use_cuda_graphs = cuda_graphs
        self._graphed: dict[int, GraphedForward] = {}
        self.last_decode_tiled = False
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size

    def embed(self, prompt: str) -> torch.Tensor:
        """umT5 context [1, text_len, dim] on the device in the network dtype, cached by prompt."""
        if prompt in self._embeddings:
            self._embeddings.move_to_end(prompt)
            return self._embeddings[prompt]
        with torch.no_grad():
            context = self.text_encoder.encode([prompt]).to(self.device, self.dtype)
        self._embeddings[prompt] = context
        if len(self._embeddings) > self._text_cache_size:
            self._embeddings.popitem(last=False)
        return context

    def condition(self, job: Job, shape) -> torch.Tensor:
        """I2V conditioning y = [mask (4), VAE latent of image + grey frames (16)], [N, 20, T, H, W]."""
        if job.image is None:
            raise ValueError("this is an image-to-video model: set an image first with `:image PATH`")
        image = job.image.to(self.device, torch.float32)[None, :, None]
        clip = torch.cat([image, image.new_zeros(1, 3, job.frames - 1, job.height, job.width)], dim=2)
        with torch.no_grad():
            latent = self.vae.encode(clip.to(self.vae_dtype)).to(self.dtype)
        mask = torch.zeros(1, 4, *shape[2:], device=self.device, dtype=self.dtype)
        mask[:, :, 0] = 1
        return torch.cat([mask, latent], dim=1).repeat(job.samples, 1, 1, 1, 1)

    def forward(self, index: int):
        """The callable that runs expert `index`: graphed on a GPU, moved in from host memory when parked."""
        net = self.experts[index]
        if self.park_idle_expert:
            for other in self.experts:
                if other is not net:
                    other.to("cpu")
            net.to(self.device)
        if not self.cuda_graphs:
            return net
        if id(net) not in self._graphed:
            self._graphed = {id(n): self._graphed.get(id(n)) or GraphedForward(n) for n in self.experts}
        return self._graphed[id(net)]

    @property
    def cuda_graphs(self) -> bool:
        # Experts that move between host and GPU cannot replay a graph captured at other addresses.
        return self.use_cuda_graphs and not self.park_idle_expert and self.device.type == "cuda"

    def forget_graphs(self) -> None:
        """Drop captured CUDA graphs (and their memory): the experts' modules or weights have changed."""
        self._graphed = {}

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def latents(self, job: Job, checkpoint: Checkpoint) -> torch.Tensor:
        shape = latent_shape(job)
        checkpoint("text encoder", 0, 1)
        context = self.embed(job.prompt).expand(job.samples, -1, -1)
        checkpoint("text encoder", 1, 1)
        y = self.condition(job, shape) if self.is_i2v else None

        generator = torch.Generator(self.device).manual_seed(job.seed)
        noise = sampler.initial_noise(shape, generator, self.device)
        times = sampler.rf_times(job.steps, job.sigma_max)
        expert_of_step = sampler.expert_steps(times, job.boundary) if len(self.experts) == 2 else [0] * job.steps

        def velocity(x, timesteps, i):
            return self.forward(expert_of_step[i])(x, timesteps, context, y)

        checkpoint("denoise", 0, job.steps)
        return sampler.sample(velocity, noise, steps=job.steps, sigma_max=job.sigma_max, ode=job.ode,
                              dtype=self.dtype, generator=generator,
                              on_step=lambda done, total: checkpoint("denoise", done, total))

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, checkpoint: Checkpoint, frames_sink=None) -> torch.Tensor:
        """Whole frames when they fit; when the GPU runs out of memory, again in spatial tiles (far less memory,
        slightly slower, and within a small blend error of the whole-frame decode at the seams).

        `frames_sink.write(chunk)` gets each latent frame's video frames as they are decoded (uint8 [N, F, H, W,
        3], on the CPU), for an encoder that runs meanwhile; `frames_sink.discard()` when the decode starts over
        in tiles (which makes no frames in order)."""
        def report(done, total):
            checkpoint("vae decode", done, total)

        def emit(frames):
            frames_sink.write(frames_to_uint8(frames).cpu())

        checkpoint("vae decode", 0, latent.shape[2])
        try:
            video = self.vae.decode(latent.to(self.vae_dtype), on_chunk=report,
                                    on_frames=emit if frames_sink is not None else None)
            self.last_decode_tiled = False
        except torch.cuda.OutOfMemoryError:
            if frames_sink is not None:
                frames_sink.discard()
            torch.cuda.empty_cache()
            video = self.vae.decode(latent.to(self.vae_dtype), on_chunk=report, tile=VAE_TILE)
            self.last_decode_tiled = True
        return frames_to_uint8(video)

    def __call__(self, job: Job, checkpoint: Checkpoint, frames_sink=None) -> torch.Tensor:
        return self.decode(self.latents(job, checkpoint), checkpoint, frames_sink)


