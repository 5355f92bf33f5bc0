"""`turbo-repl bench` on the tiny model on the CPU: every stage is measured and the output parses."""

import json

from turbo_repl.cli import main


def test_bench_reports_every_stage_as_json_lines(capsys):
    assert main(["bench", "--json", "--repeat", "1", "--set", "frames=5", "--set", "steps=2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    metrics = {r["metric"]: r for r in rows}
    for name in ("text encoder (new prompt)", "DiT step 1", "DiT step 2", "DiT, 2 steps", "VAE decode",
                 "mp4 encode, on its own", "whole run, prompt to mp4 (prompt cached)",
                 "whole run, prompt to mp4 (new prompt)", "DiT forward",
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



def _resident_pages(path) -> int:
    """How many of the file's pages are in the page cache (mincore over a private mapping of it)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        start = ctypes.addressof(ctypes.c_char.from_buffer(view))
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        del start
        return sum(v & 1 for v in vec)
    finally:
        view.close()


def test_cold_load_evicts_the_checkpoint_from_the_page_cache(tmp_path):
    import os

    import pytest

    from turbo_repl.bench import evict_from_page_cache

    path = tmp_path / "dit.safetensors"
    path.write_bytes(os.urandom(4 << 20))
    path.read_bytes()
    before = _resident_pages(path)
    if before == 0:
        pytest.skip("this filesystem keeps no page cache for the file")
    evict_from_page_cache(path)
    assert _resident_pages(path) < before // 4
