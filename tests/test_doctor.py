"""`turbo-repl doctor` on this CPU-only machine, with a hub cache that holds some checkpoints."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import torch
from hub_helpers import put_in_cache, run_cli

from turbo_repl.models.locate import needed_files
from turbo_repl.models.registry import get_model, model_names


def doctor(tmp_path, *args: str) -> subprocess.CompletedProcess:
    result = run_cli(tmp_path, "doctor", *args, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """doctor --json with the int8 files of wan2.1-1.3b in the cache, and nothing else."""
    tmp_path = tmp_path_factory.mktemp("doctor")
    for need in needed_files(get_model("wan2.1-1.3b"), quant=True):
        put_in_cache(tmp_path / "hub", need.repo, need.filename)
    return json.loads(doctor(tmp_path, "--json").stdout)


def test_doctor_json_reports_no_gpu_and_the_versions_here(report):
    assert report["device"] == "cpu" and report["gpu"] is None
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["cuda"] == torch.version.cuda
    assert report["hub"]["offline"] is True


def test_doctor_finds_the_ffmpeg_that_runs(report):
    ffmpeg = report["ffmpeg"]
    out = subprocess.run([ffmpeg["path"], "-version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ffmpeg version") and ffmpeg["version"] in out.splitlines()[0]


def test_doctor_reports_checkpoints_per_model(report):
    models = report["models"]
    assert list(models) == model_names()
    assert models["tiny"] == {"task": "t2v", "builtin": True, "available": True}
    assert models["tiny-i2v"]["available"] is True
    m = models["wan2.1-1.3b"]
    assert m["available"] is True and m["int8"]["present"] is True
    assert m["bf16"] == {"present": False, "missing": ["TurboDiffusion/TurboWan2.1-T2V-1.3B-480P/"
                                                       "TurboWan2.1-T2V-1.3B-480P.pth"],
                         "files": len(needed_files(get_model("wan2.1-1.3b"), quant=False)),
                         "fetch": "turbo-repl download wan2.1-1.3b"}
    i2v = models["wan2.2-a14b-i2v"]
    assert i2v["available"] is False and len(i2v["int8"]["missing"]) == 2   # shares all but its two experts
    assert i2v["bf16"]["fetch"] == "turbo-repl download wan2.2-a14b-i2v"


def test_doctor_reports_backends_and_what_auto_picks(report):
    attention, linear = report["attention"], report["linear"]
    assert attention["backends"]["original"] == "ok"
    if importlib.util.find_spec("turbo_kernels.sla") is None:
        assert attention["backends"]["sla"].startswith("unknown (")
    if importlib.util.find_spec("turbo_repl.engine.backends") is not None:
        from turbo_repl.engine.backends import choose_attention, choose_quant

        cpu = torch.device("cpu")
        assert attention["auto"] == choose_attention("auto", cpu, sparse_checkpoint=True)[0]
        assert linear["backends"]["off"] == "ok"
        assert set(linear["backends"]) == {"off", "int8", "fp8"}
        assert linear["auto"].startswith(f"as the checkpoint: {choose_quant('auto', 'int8', cpu)} with -quant")


def test_doctor_table_for_people(tmp_path):
    out = doctor(tmp_path).stdout
    assert "none (CPU only)" in out
    assert "built in" in out
    n = len(needed_files(get_model("wan2.1-1.3b"), quant=False))
    assert f"missing {n} of {n} — turbo-repl download wan2.1-1.3b" in out
    assert f"missing {n} of {n} — turbo-repl download wan2.1-1.3b --quant" in out
