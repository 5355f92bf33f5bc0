"""Makes the reference outputs in this folder that the shared fixtures do not cover.

* `vae_stream.safetensors`: the reference Wan VAE (TurboDiffusion `rcm/tokenizers/wan2pt1.py`, `WanVAE_`)
  on four latent frames (13 video frames), float32. The shared `vae` fixture has two latent frames; four
  exercise the temporal caches after the upsamplers' first-frame special case.
* `umt5_bf16.safetensors`: the reference umT5 encoder (TurboDiffusion `rcm/utils/umt5.py`, `T5Encoder`) run in
  bfloat16, as TurboDiffusion runs it, on the shared `umt5` fixture's weights and token ids.

Both use the shared fixtures' weights and run on the CPU. The framework modules those files import for
logging, checkpoint I/O and tokenisation are stubbed; the networks themselves are not.

    python tests/data/make_reference_data.py PATH/TO/turbodiffusion FIXTURES_DIR   # needs einops
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent


def _stub(**modules) -> None:
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        for k, v in (attrs or {}).items():
            setattr(mod, k, v)
        sys.modules[name] = mod


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fixture(fixtures: Path, name: str):
    meta = json.loads((fixtures / f"{name}.json").read_text())
    files = meta["files"]
    return meta, load_file(str(fixtures / files["weights"]["file"])), load_file(str(fixtures / files["io"]["file"]))


def vae_stream(td: Path, fixtures: Path) -> None:
    _stub(**{"imaginaire": None, "imaginaire.utils": {"log": types.SimpleNamespace(info=print)},
             "imaginaire.utils.distributed": {"get_rank": lambda: 0, "sync_model_states": lambda m: None},
             "imaginaire.utils.easy_io": {"easy_io": None}, "rcm": None, "rcm.tokenizers": None,
             "rcm.tokenizers.interface": {"VideoTokenizerInterface": object}})
    ref = _load(td / "rcm/tokenizers/wan2pt1.py", "ref_wan2pt1")
    meta, weights, _ = _fixture(fixtures, "vae")
    vae = ref.WanVAE_(**meta["constructor"]["kwargs"]).eval()
    vae.load_state_dict(weights, strict=True)
    stats = meta["latent_normalisation"]
    scale = [torch.tensor(stats["mean"]), 1.0 / torch.tensor(stats["std"])]

    g = torch.Generator().manual_seed(20250101)
    video = torch.rand(1, 3, 13, 16, 24, generator=g) * 2 - 1
    latent_in = torch.randn(1, 16, 4, 2, 3, generator=g)
    with torch.no_grad():
        latent = vae.encode(video, scale)
        recon = vae.decode(latent_in, scale)
    save_file({"video": video, "latent": latent.contiguous(), "latent_in": latent_in, "recon": recon.contiguous()},
              str(HERE / "vae_stream.safetensors"),
              metadata={"reference": "thu-ml/TurboDiffusion rcm/tokenizers/wan2pt1.py WanVAE_ encode/decode",
                        "weights": "shared fixture vae.weights.safetensors"})


def umt5_bf16(td: Path, fixtures: Path) -> None:
    _stub(**{"ftfy": None, "regex": None, "transformers": {"AutoTokenizer": None}, "imaginaire": None,
             "imaginaire.utils": {"distributed": None, "log": None, "misc": None},
             "imaginaire.utils.easy_io": {"easy_io": None}})
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"   # only a default argument of a class the test does not use
    try:
        ref = _load(td / "rcm/utils/umt5.py", "ref_umt5")
    finally:
        torch.cuda.current_device = current_device
    meta, weights, io = _fixture(fixtures, "umt5")
    encoder = ref._t5("umt5", encoder_only=True, **meta["constructor"]["cfg"]).eval()
    encoder.load_state_dict(weights, strict=True)
    encoder.to(torch.bfloat16)
    with torch.no_grad():
        out = encoder(io["ids"], io["mask"])
    save_file({"encoder_out": out.contiguous()}, str(HERE / "umt5_bf16.safetensors"),
              metadata={"reference": "thu-ml/TurboDiffusion rcm/utils/umt5.py T5Encoder.forward in bfloat16",
                        "weights": "shared fixture umt5.weights.safetensors", "inputs": "shared fixture umt5 ids, mask"})


if __name__ == "__main__":
    turbodiffusion, fixtures_dir = Path(sys.argv[1]), Path(sys.argv[2])
    vae_stream(turbodiffusion, fixtures_dir)
    umt5_bf16(turbodiffusion, fixtures_dir)
