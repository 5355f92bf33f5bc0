"""Makes vae_stream.safetensors: the reference Wan VAE run on more chunks than the shared `vae` fixture has.

The shared fixture covers two latent frames (the first chunk and one more). This adds four latent frames
(13 video frames), which exercises the temporal caches after the upsamplers' first-chunk special case.
It runs TurboDiffusion's own `rcm/tokenizers/wan2pt1.py` (`WanVAE_`), float32 on the CPU, with the
shared fixture's weights:

    python tests/data/make_vae_stream.py PATH/TO/wan2pt1.py FIXTURES_DIR   # needs einops

The framework modules that file imports for logging and checkpoint I/O are stubbed; the VAE itself is not.
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(ref_file: str, fixtures: str) -> None:
    stubs = ["imaginaire", "imaginaire.utils", "imaginaire.utils.distributed", "imaginaire.utils.easy_io",
             "rcm", "rcm.tokenizers", "rcm.tokenizers.interface"]
    for name in stubs:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["imaginaire.utils"].log = types.SimpleNamespace(info=print)
    sys.modules["imaginaire.utils.distributed"].get_rank = lambda: 0
    sys.modules["imaginaire.utils.distributed"].sync_model_states = lambda m: None
    sys.modules["imaginaire.utils.easy_io"].easy_io = None
    sys.modules["rcm.tokenizers.interface"].VideoTokenizerInterface = object
    spec = importlib.util.spec_from_file_location("ref_wan2pt1", ref_file)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    meta = json.loads((Path(fixtures) / "vae.json").read_text())
    vae = ref.WanVAE_(**meta["constructor"]["kwargs"]).eval()
    vae.load_state_dict(load_file(str(Path(fixtures) / meta["files"]["weights"]["file"])), strict=True)
    stats = meta["latent_normalisation"]
    scale = [torch.tensor(stats["mean"]), 1.0 / torch.tensor(stats["std"])]

    g = torch.Generator().manual_seed(20250101)
    video = torch.rand(1, 3, 13, 16, 24, generator=g) * 2 - 1
    latent_in = torch.randn(1, 16, 4, 2, 3, generator=g)
    with torch.no_grad():
        latent = vae.encode(video, scale)
        recon = vae.decode(latent_in, scale)
    out = Path(__file__).with_name("vae_stream.safetensors")
    save_file({"video": video, "latent": latent.contiguous(), "latent_in": latent_in, "recon": recon.contiguous()},
              str(out), metadata={"reference": "thu-ml/TurboDiffusion rcm/tokenizers/wan2pt1.py WanVAE_",
                                  "weights": "shared fixture vae.weights.safetensors"})
    print(out, {k: list(v.shape) for k, v in [("latent", latent), ("recon", recon)]})


if __name__ == "__main__":
    main(*sys.argv[1:3])
