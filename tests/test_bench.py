"""`turbo-repl bench` on the tiny model on the CPU: every stage is measured and the output parses."""

import json

from turbo_repl.cli import main


def test_bench_reports_every_stage_as_json_lines(capsys):
    assert main(["bench", "--json", "--repeat", "1", "--set", "frames=5", "--set", "steps=2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    metrics = {r["metric"]: r for r in rows}
    for name in ("text encoder (new prompt)", "DiT step 1", "DiT step 2", "DiT, 2 steps", "VAE decode",
                 "mp4 encode", "whole run, prompt to mp4 (new prompt)", "DiT forward",
                 "baseline DiT forward (dense attention, unquantised linears)", "original Wan recipe (50 steps x CFG)",
                 "DiT speed-up over the original recipe", "load of the DiT from a local file"):
        assert name in metrics, name
        assert metrics[name]["value"] > 0
    assert all(r["model"] == "tiny" and r["steps"] == 2 and r["frames"] == 5 for r in rows)
    assert any(name.startswith("DiT forward: ") for name in metrics)
    recipe = metrics["original Wan recipe (50 steps x CFG)"]["value"]
    assert abs(recipe - 100 * metrics["baseline DiT forward (dense attention, unquantised linears)"]["value"]) < 0.01 * recipe
    speedup = metrics["DiT speed-up over the original recipe"]["value"]
    assert abs(speedup - recipe / metrics["DiT, 2 steps"]["value"]) < 0.01 * speedup


def test_bench_refuses_a_bad_setting(capsys):
    assert main(["bench", "--set", "steps=9"]) == 2
    err = capsys.readouterr().err
    assert "steps" in err and len(err.strip().splitlines()) == 1


def test_bench_image_to_video_makes_its_own_image(capsys):
    assert main(["bench", "--json", "--model", "tiny-i2v", "--repeat", "1", "--set", "frames=5", "--set", "steps=3",
                 "--skip", "load", "--skip", "mp4", "--skip", "components"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    metrics = {r["metric"] for r in rows}
    assert {"DiT step 3", "VAE decode", "baseline DiT forward (dense attention, unquantised linears)"} <= metrics
