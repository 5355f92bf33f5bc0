"""The Engine: load a model once, keep it on the device, turn requests into videos."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from turbo_repl.engine import pipeline as pl
from turbo_repl.engine.backends import choose_attention, choose_quant, environment
from turbo_repl.engine.types import Cancelled, Request, Video
from turbo_repl.models.registry import ModelSpec, get_model


def pick_device(name: str = "auto") -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this machine has no usable CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Engine:
    def __init__(self, model: str = "tiny", checkpoint_dir: str | Path | None = None, device: str = "auto",
                 quant: str = "auto", weights: str = "checkpoint", cuda_graphs: bool | None = None):
        """`weights="random"` builds a real architecture with random weights on the device (benchmarks).
        `cuda_graphs` (default: on unless TURBO_REPL_CUDA_GRAPHS=0) replays each DiT forward as a CUDA graph:
        fewer launches, at the price of a memory pool per captured shape."""
        self.spec: ModelSpec = get_model(model)
        self.device = pick_device(device)
        # bf16 on the GPU, as the reference runs; float32 on the CPU, where bf16 is slow and parity is exact.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.checkpoint_dir = checkpoint_dir
        started = time.perf_counter()
        self.components = _load(self.spec, checkpoint_dir, self.device, self.dtype, quant, weights)
        self.pipeline = pl.Pipeline(
            self.components.text_encoder, self.components.experts, self.components.vae,
            device=self.device, dtype=self.dtype, task=self.spec.task,
            park_idle_expert=self.components.park_idle_expert,
            cuda_graphs=os.environ.get("TURBO_REPL_CUDA_GRAPHS", "1") != "0" if cuda_graphs is None else cuda_graphs)
        self.load_seconds = time.perf_counter() - started
        self.info = {
            "model": self.spec.name,
            "task": self.spec.task,
            "builtin": self.spec.builtin,
            "checkpoints": self.components.fingerprints,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quant": self.components.quant,
            "sparse_checkpoint": self.components.sparse,
            "load_seconds": round(self.load_seconds, 3),
            **environment(self.device),
        }

    # -- one generation -------------------------------------------------------------------------------------
    def job(self, request: Request) -> pl.Job:
        """Translate settings into the pipeline's plain values (sizes, steps, conditioning image)."""
        from turbo_repl.settings import resolution_size
        from turbo_repl.video import load_image

        s = request.settings
        width, height = resolution_size(s.resolution, s.aspect)
        image = None
        if self.spec.task == "i2v":
            if not s.image:
                raise ValueError("this is an image-to-video model: set an image first with `:image PATH`")
            rgb = torch.tensor(load_image(s.image))
            if s.adaptive:
                width, height = pl.adaptive_size(rgb.shape[1], rgb.shape[0], width * height)
            image = pl.preprocess_image(rgb, width, height)
        elif s.image:
            raise ValueError(f"{self.spec.name} is a text-to-video model and takes no image: `:reset image`")
        return pl.Job(prompt=request.prompt, width=width, height=height, frames=s.frames, steps=s.steps,
                      sigma_max=s.sigma_max, ode=s.ode, samples=s.samples, seed=request.seed,
                      boundary=s.boundary, image=image)

    def configure(self, settings) -> dict:
        """Apply the run-time backend settings (no reload for attention or topk); returns what was chosen."""
        from turbo_repl.models.attention import configure_attention

        attention, why = choose_attention(settings.attention, self.device, self.components.sparse)
        quant = choose_quant(settings.quant, self.components.native_quant, self.device)
        if quant != self.components.quant:   # first: a reload brings new expert modules
            self.pipeline.forget_graphs()    # captured graphs point at the old linears' weights
            self.components.requantize(quant)
            self.pipeline.park_idle_expert = self.components.park_idle_expert
            self.info["quant"] = quant
        if quant == "int8" and self.device.type == "cuda":
            from turbo_repl.models.linear import use_channel_scales

            for expert in self.components.experts:   # before any graph capture; a no-op once done
                use_channel_scales(expert)
        for expert in self.components.experts:
            configure_attention(expert, attention, settings.topk)
        return {"attention": attention, "attention_reason": why, "quant": quant}

    def generate(self, request: Request, progress=None, cancel=None, frames_sink=None) -> Video:
        """One generation; `frames_sink` (see Pipeline.decode) gets the frames while the VAE decodes them."""
        timings: dict[str, float] = {}
        stage_start = {"t": time.perf_counter()}
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def checkpoint(stage: str, done: int, total: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled during {stage}")
            if done == total or done == 0:
                sync()   # honest stage timings: wait for the device at stage edges only
                now = time.perf_counter()
                if done == total:
                    timings[stage] = round(now - stage_start["t"], 4)
                stage_start["t"] = now
            if progress is not None:
                progress(stage, done, total)

        job = self.job(request)
        started = time.perf_counter()
        try:
            backends = self.configure(request.settings)
            frames = self.pipeline(job, checkpoint, frames_sink).cpu()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            advice = "fewer frames or a lower resolution" + (
                "" if self.components.quant != "off" else ", or 8-bit weights (`:set quant fp8` or `int8`)")
            raise MemoryError(f"out of GPU memory at {job.width}x{job.height}, {job.frames} frames, "
                              f"{job.samples} sample(s): try {advice}") from None
        timings["total"] = round(time.perf_counter() - started, 4)
        info = {**self.info, **backends, "width": job.width, "height": job.height, "frames": job.frames,
                "generator_device": str(self.device), "vae_tiled": self.pipeline.last_decode_tiled}
        return Video(frames=frames, seed=request.seed, fps=request.settings.fps, timings=timings, info=info)


# -- loading ----------------------------------------------------------------------------------------------------
class Components:
    def __init__(self, text_encoder, experts, vae, *, fingerprints, quant, sparse, park_idle_expert, reload,
                 native_quant=None):
        self.text_encoder, self.experts, self.vae = text_encoder, experts, vae
        self.fingerprints, self.quant, self.sparse = fingerprints, quant, sparse
        # what the checkpoint files hold (not fp8, which is quantised at load): `quant auto` returns to it
        self.native_quant = native_quant or quant
        self.park_idle_expert = park_idle_expert
        self._reload = reload

    def requantize(self, quant: str) -> None:
        """Switch the DiT experts' linear layers: bf16 ones are quantised in place (no second copy of the
        weights); any other change reloads the experts. The old experts wait in host memory meanwhile, so the
        new ones have the GPU to themselves, and come back unchanged if the reload fails."""
        if self.quant == "off" and quant in ("int8", "fp8"):
            from turbo_repl.models.linear import convert_linears

            for net in self.experts:   # on a GPU int8 goes straight to the per-channel form it runs in
                convert_linears(net, quant, channel_scales=next(net.parameters()).is_cuda)
        else:
            old = [(net, next(net.parameters()).device) for net in self.experts]
            for net, _ in old:
                net.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                new = self._reload(quant)
            except BaseException:
                for net, device in old:
                    net.to(device)
                raise
            self.experts[:] = new
            first = next(new[0].parameters()).device.type
            self.park_idle_expert = any(next(n.parameters()).device.type != first for n in new)
        self.quant = quant


def _load(spec: ModelSpec, checkpoint_dir, device, dtype, quant: str, weights: str) -> Components:
    if spec.builtin or weights == "random":
        return _load_generated(spec, device, dtype, on_device=weights == "random")
    return _load_files(spec, checkpoint_dir, device, dtype, quant)


def _generated(build, seed: int, device, dtype, on_device: bool):
    """A module with deterministic random weights. The tiny models are filled on the CPU (the same weights on every
    machine); benchmarks of the real architectures build and fill on the device, in the run dtype."""
    from turbo_repl.models.tiny import deterministic_init

    if not on_device:
        return deterministic_init(build(), seed).eval().to(device, dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = build()
    finally:
        torch.set_default_dtype(default)
    return deterministic_init(module, seed).eval()


def _load_generated(spec: ModelSpec, device, dtype, on_device: bool) -> Components:
    from turbo_repl.models.dit import WanDiT
    from turbo_repl.models.t5 import TextEncoder, UMT5Encoder
    from turbo_repl.models.tiny import seed_for
    from turbo_repl.models.tokenizer import load_tokenizer
    from turbo_repl.models.vae import WanVAE

    te = spec.text_encoder
    encoder = _generated(lambda: UMT5Encoder(**te.arch), seed_for(f"{te.name}/text_encoder"), device, dtype,
                         on_device)
    # Generated weights come without tokenizer files: token ids from UTF-8 bytes are valid for any vocabulary.
    tokenizer = load_tokenizer(te.tokenizer if spec.builtin else {"kind": "bytes"}, None)
    text_encoder = TextEncoder(encoder, tokenizer, te.text_len)
    vae = _generated(lambda: WanVAE(**spec.vae.arch), seed_for(f"{spec.vae.name}/vae"), device, dtype, on_device)

    def experts(quant: str):
        nets = [_generated(lambda: WanDiT(**spec.dit, sparse_attention=True), seed_for(f"{spec.name}/{name}"),
                           device, dtype, on_device).place(device, dtype) for name in spec.experts]
        if quant in ("int8", "fp8"):
            from turbo_repl.models.linear import convert_linears

            for net in nets:
                convert_linears(net, quant, channel_scales=device.type == "cuda")
        return nets

    kind = "builtin" if spec.builtin else "random"
    fingerprints = {name: f"{kind}:{spec.name}/{name}" for name in spec.experts}
    return Components(text_encoder, experts("off"), vae, fingerprints=fingerprints, quant="off", sparse=True,
                      park_idle_expert=False, reload=experts)


def _load_files(spec: ModelSpec, checkpoint_dir, device, dtype, quant: str) -> Components:
    from turbo_repl.models.checkpoint import fingerprint, load_into, read_state_dict
    from turbo_repl.models.locate import locate
    from turbo_repl.models.t5 import TextEncoder, UMT5Encoder
    from turbo_repl.models.tokenizer import load_tokenizer
    from turbo_repl.models.vae import WanVAE

    files = _locate_for(spec, checkpoint_dir, quant)
    te = spec.text_encoder
    with torch.device("meta"):
        encoder = UMT5Encoder(**te.arch)
        vae = WanVAE(**spec.vae.arch)
    encoder = load_into(encoder, read_state_dict(files.text_encoder), what=f"{spec.name} text encoder",
                        path=files.text_encoder).eval().to(dtype=dtype)
    text_encoder = TextEncoder(encoder, load_tokenizer(te.tokenizer, files.tokenizer), te.text_len)
    vae = load_into(vae, read_state_dict(files.vae), what=f"{spec.name} VAE", path=files.vae).eval().to(device, dtype)

    fingerprints: dict[str, str] = {}   # the run records' view: updated when the experts are reloaded

    def experts(mode: str):
        """The DiT experts with their linears in `mode`: int8 from the -quant checkpoints, fp8 quantised from
        the bf16 ones at load, off = the bf16 checkpoints as they are."""
        paths = files.experts if files.quant == (mode == "int8") else locate(
            spec.name, checkpoint_dir=checkpoint_dir, quant=mode == "int8").experts
        # Two experts that do not both fit: the second waits in host memory until the switch.
        sizes = [Path(paths[name]).stat().st_size for name in spec.experts]
        placed = [device if i == 0 or _fits(sum(sizes), device) else "cpu" for i in range(len(sizes))]
        nets = [_dit_from_file(spec, paths[name], dtype, where) for name, where in zip(spec.experts, placed)]
        if mode == "fp8":
            from turbo_repl.models.linear import convert_linears

            for net in nets:
                convert_linears(net, "fp8")
        fingerprints.update({name: fingerprint(paths[name]) for name in spec.experts})
        return nets

    nets = experts("int8" if files.quant else quant if quant == "fp8" else "off")
    park = any(next(n.parameters()).device.type != device.type for n in nets)
    # umT5-XXL is 11 GB in bf16: it stays on the GPU only when it fits beside the rest, else it encodes on the
    # CPU (embeddings are cached per prompt, so that cost is paid once per prompt).
    text_encoder.to(device if _fits(_module_bytes(encoder), device) else "cpu")
    fingerprints.update(vae=fingerprint(files.vae), text_encoder=fingerprint(files.text_encoder))
    loaded = "int8" if any(hasattr(m, "int8_weight") for m in nets[0].modules()) else (
        "fp8" if quant == "fp8" else "off")
    sparse = any(getattr(m, "proj_l", None) is not None for m in nets[0].modules())
    return Components(text_encoder, nets, vae, fingerprints=fingerprints, quant=loaded, sparse=sparse,
                      park_idle_expert=park, reload=experts, native_quant="int8" if files.quant else "off")


def _locate_for(spec: ModelSpec, checkpoint_dir, quant: str):
    """The files for `quant`: int8 wants the -quant checkpoints; auto takes the bf16 ones, or the -quant ones when
    only those were downloaded."""
    from turbo_repl.models.locate import MissingCheckpoint, locate

    try:
        return locate(spec.name, checkpoint_dir=checkpoint_dir, quant=quant == "int8")
    except MissingCheckpoint:
        if quant != "auto":
            raise
        try:
            return locate(spec.name, checkpoint_dir=checkpoint_dir, quant=True)
        except MissingCheckpoint:
            pass
        raise


def _dit_from_file(spec: ModelSpec, path, dtype, device):
    from turbo_repl.models.checkpoint import dit_from_checkpoint

    return dit_from_checkpoint(spec.dit, path, device=device, dtype=dtype, name=spec.name).eval()


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _fits(nbytes: int, device: torch.device, reserve: float = 0.15) -> bool:
    """Whether `nbytes` more fit on the device, keeping a fraction of it free for activations."""
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    return nbytes < free - reserve * total
