"""`turbo-repl parity DIR`: run turbo-repl's components on golden fixtures made by the reference code.

A fixture is `NAME.json` (a sidecar: kind, files, constructor, config, inputs, outputs, tolerance) beside its
`.safetensors` files. Every fixture in DIR is run through the matching component, whatever its shapes; each
compared tensor gets one line with max|out - ref| / max|ref| against the fixture's threshold.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass
class Check:
    fixture: str
    tensor: str
    error: float
    threshold: float
    exact: bool = False

    @property
    def passed(self) -> bool:
        return self.error == 0.0 if self.exact else self.error <= self.threshold


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| (the fixtures' metric); NaN anywhere counts as infinitely wrong."""
    out, ref = out.detach().double().cpu(), ref.double()
    if out.shape != ref.shape:
        return float("inf")
    diff = (out - ref).abs().max()
    if torch.isnan(diff):
        return float("inf")
    scale = ref.abs().max()
    return (diff / scale).item() if scale > 0 else diff.item()


class Fixture:
    def __init__(self, sidecar: Path):
        self.dir = sidecar.parent
        self.meta = json.loads(sidecar.read_text())
        self.name, self.kind = self.meta["name"], self.meta["kind"]

    def tensors(self, role: str = "io") -> dict[str, torch.Tensor]:
        return load_file(self.dir / self.meta["files"][role]["file"])

    @property
    def threshold(self) -> float:
        return float(self.meta["tolerance"]["threshold"])

    def wanted(self, names) -> list[str]:
        """Tensor names matching the sidecar's `outputs` patterns (`*` is a wildcard)."""
        return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.meta["outputs"]))

    def compare(self, produced: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[Check]:
        exact = set(self.meta["tolerance"].get("exact", []))
        names = self.wanted(ref)
        missing = [n for n in names if n not in produced]
        if missing:
            raise RuntimeError(f"{self.name}: produced no value for {', '.join(missing)}")
        return [Check(self.name, n, relative_error(produced[n], ref[n]), self.threshold, n in exact) for n in names]


# -- one runner per fixture kind ------------------------------------------------------------------------------
def _dit(arch: dict, weights: Path):
    from turbo_repl.models.checkpoint import dit_from_checkpoint

    return dit_from_checkpoint(arch, weights, device="cpu", dtype=torch.float32).eval()


def run_dit(fx: Fixture) -> list[Check]:
    io = fx.tensors()
    net = _dit(fx.meta["constructor"]["kwargs"], fx.dir / fx.meta["files"]["weights"]["file"])
    with torch.no_grad():
        out = net(io["x_B_C_T_H_W"], io["timesteps_B_T"], io["crossattn_emb"], io.get("y_B_C_T_H_W"))
    return fx.compare({"output": out}, io)


def run_umt5(fx: Fixture) -> list[Check]:
    from turbo_repl.models.t5 import TextEncoder, UMT5Encoder

    cfg = fx.meta["constructor"]["cfg"]
    arch = {k: cfg[k] for k in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_buckets",
                                 "shared_pos")}
    encoder = UMT5Encoder(num_layers=cfg["encoder_layers"], **arch).eval()
    encoder.load_state_dict(fx.tensors("weights"), strict=True)
    io = fx.tensors()
    with torch.no_grad():
        out = encoder(io["ids"], io["mask"])
        context = TextEncoder(encoder, tokenizer=None, text_len=io["ids"].shape[1]).context(io["ids"], io["mask"])
    return fx.compare({"encoder_out": out, "context": context}, io)


def run_vae(fx: Fixture) -> list[Check]:
    from turbo_repl.models.vae import WanVAE

    vae = WanVAE(**fx.meta["constructor"]["kwargs"]).eval()
    vae.load_state_dict(fx.tensors("weights"), strict=True)
    io = fx.tensors()
    with torch.no_grad():
        produced = {"latent": vae.encode(io["video"]), "latent_raw_mu": vae.encode(io["video"], normalize=False),
                    "recon": vae.decode(io["latent"])}
    return fx.compare(produced, io)


def run_rcm_sampler(fx: Fixture) -> list[Check]:
    from turbo_repl.engine import sampler

    io, den = fx.tensors(), fx.meta["denoiser"]
    arch = den["kwargs"]
    nets = [_dit(arch, fx.dir / den[k]) for k in ("weights", "high_noise", "low_noise") if k in den]
    boundary = den.get("boundary", fx.meta["config"].get("boundary", 0.9))
    y = io.get("y_B_C_T_H_W")
    context = io["crossattn_emb"]
    produced = {}
    for run in sorted({m.group(1) for n in io for m in [re.match(r"(n\d+\.(?:sde|ode))\.", n)] if m}):
        steps = int(run[1:].split(".")[0])
        times = sampler.rf_times(steps, fx.meta["config"]["sigma_max"])
        experts = sampler.expert_steps(times, boundary) if len(nets) == 2 else [0] * steps
        noise = io[f"{run}.init_noise"]
        batch = noise.shape[0]

        def velocity(x, timesteps, i, run=run):
            produced[f"{run}.step{i}.x_in"] = x
            cond = y.expand(batch, *y.shape[1:]) if y is not None else None
            v = nets[experts[i]](x, timesteps, context.expand(batch, *context.shape[1:]), cond)
            produced[f"{run}.step{i}.v_pred"] = v
            return v

        with torch.no_grad():
            produced[f"{run}.final"] = sampler.sample(
                velocity, noise, steps=steps, sigma_max=fx.meta["config"]["sigma_max"], ode=run.endswith("ode"),
                dtype=torch.float32, step_noise=lambda i, run=run: io[f"{run}.step{i}.noise"])
    return fx.compare(produced, io)


def run_sla_attention(fx: Fixture) -> list[Check]:
    from turbo_kernels.sla import block_map, sparse_linear_attention

    io, cfg = fx.tensors(), fx.meta["config"]
    produced = {}
    for topk in cfg["topks"]:
        args = dict(topk=topk, block_q=cfg["BLKQ"], block_k=cfg["BLKK"])
        produced[f"out.topk{topk}"] = sparse_linear_attention(
            io["q"], io["k"], io["v"], io["proj_l.weight"], io["proj_l.bias"], impl="torch", **args)
        produced[f"block_map.topk{topk}"] = block_map(io["q"], io["k"], **args).to(torch.int8)
    checks = fx.compare(produced, io)
    # block maps are selections: they must be equal, not close
    for name in (n for n in io if n.startswith("block_map.") and n in produced):
        checks.append(Check(fx.name, name, float((produced[name] != io[name]).sum()), 0.0, exact=True))
    return checks


def run_quant_linear(fx: Fixture) -> list[Check]:
    import torch.nn.functional as F

    io = fx.tensors()
    produced = {"y_float": F.linear(io["x"].float(), io["weight"].float(), io["bias"].float())}
    if "int8_weight" in io:   # the reference's int8 numerics, in our plain-torch reference mode
        from turbo_kernels.gemm8 import int8_linear_tiles_trace

        from turbo_repl.models.linear import reference_int8_trace

        produced.update(reference_int8_trace(io["x"], io["weight"], io["bias"]))
        # The forward is checked on the reference's own int8 weights: the fixture's quantiser and ours may round
        # a rare tie differently (checked below), and one such weight flips a bf16 rounding of y by one ulp.
        forward = int8_linear_tiles_trace(io["x"], io["int8_weight"], io["scale"], io["bias"])
        produced.update(y_gemm=forward["y_gemm"], y=forward["y"])
    checks = fx.compare(produced, io)
    if "int8_weight" in io:   # rounding ties may differ on a handful of elements (the sidecar says so)
        for c in checks:
            if c.tensor == "int8_weight":
                ties = (produced["int8_weight"].int() - io["int8_weight"].int()).abs()
                c.tensor = "int8_weight (share tied)"
                c.error, c.threshold = float((ties > 0).float().mean()), 1e-3
                c.exact = bool(ties.max() > 1)
    return checks


RUNNERS = {"dit": run_dit, "umt5": run_umt5, "vae": run_vae, "rcm_sampler": run_rcm_sampler,
           "sla_attention": run_sla_attention, "quant_linear": run_quant_linear}


def find_fixtures(directory: Path) -> list[Fixture]:
    sidecars = []
    for path in sorted(directory.glob("*.json")):
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(meta, dict) and "kind" in meta and "files" in meta:
            sidecars.append(Fixture(path))
    return sidecars


def run_fixture(fx: Fixture) -> list[Check]:
    runner = RUNNERS.get(fx.kind)
    if runner is None:
        raise RuntimeError(f"unknown fixture kind '{fx.kind}'")
    return runner(fx)


# -- command line -------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("directory", type=Path, help="folder of fixtures (NAME.json + .safetensors)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these fixtures")
    parser.add_argument("--json", action="store_true", help="one JSON object per compared tensor")


def run(args) -> int:
    if not args.directory.is_dir():
        print(f"parity: {args.directory} is not a folder of fixtures", file=sys.stderr)
        return 2
    fixtures = [f for f in find_fixtures(args.directory) if not args.only or f.name in args.only]
    if not fixtures:
        print(f"parity: no fixtures (NAME.json with 'kind' and 'files') in {args.directory}", file=sys.stderr)
        return 2
    failed = 0
    for fx in fixtures:
        try:
            checks = run_fixture(fx)
        except Exception as e:  # one broken fixture must not hide the others' results
            failed += 1
            print(json.dumps({"fixture": fx.name, "status": "ERROR", "error": str(e)}) if args.json
                  else f"ERROR {fx.name}: {e}")
            continue
        for c in checks:
            failed += not c.passed
            status = "PASS" if c.passed else "FAIL"
            if args.json:
                print(json.dumps({"fixture": c.fixture, "tensor": c.tensor, "error": c.error,
                                  "threshold": c.threshold, "exact": c.exact, "status": status}))
            else:
                bound = "exact" if c.exact else f"<= {c.threshold:.0e}"
                print(f"{status} {c.fixture:<22} {c.tensor:<28} {c.error:.3e} ({bound})")
    total = sum(1 for _ in fixtures)
    print(f"{total} fixtures, {'all passed' if not failed else f'{failed} failed'}", file=sys.stderr)
    return 1 if failed else 0
