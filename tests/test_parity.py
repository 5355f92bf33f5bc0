"""`turbo-repl parity DIR` on the shipped fixtures, and on folders in the same format with other shapes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbo_repl.cli import main


def run(capsys, *args):
    code = main(["parity", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def copy_fixture(src, dst, name, change):
    """Copy fixture `name` into dst, letting `change(meta, io)` rewrite its sidecar and io tensors."""
    meta = json.loads((src / f"{name}.json").read_text())
    for role, entry in meta["files"].items():
        if role != "io":
            shutil.copy(src / entry["file"], dst / entry["file"])
    io = load_file(src / meta["files"]["io"]["file"])
    change(meta, io)
    save_file({k: v.contiguous() for k, v in io.items()}, dst / meta["files"]["io"]["file"])
    (dst / f"{name}.json").write_text(json.dumps(meta))


def test_every_shipped_fixture_passes(fixtures_dir, capsys):
    code, lines, err = run(capsys, fixtures_dir)
    assert code == 0, "\n".join(lines)
    index = json.loads((fixtures_dir / "index.json").read_text())
    named = {line.split()[1] for line in lines}
    assert named == {f["name"] for f in index["fixtures"]}
    assert all(line.startswith("PASS ") for line in lines)
    assert "all passed" in err


def test_other_batch_sizes_and_head_counts(fixtures_dir, tmp_path, capsys):
    def batch2(meta, io):          # the network treats samples independently: two copies, two equal outputs
        for k in ("x_B_C_T_H_W", "timesteps_B_T", "crossattn_emb", "output"):
            io[k] = torch.cat([io[k], io[k]])
        meta["config"]["B"] = 2

    def one_head(meta, io):        # heads are independent, block maps too: keep head 1 of 2
        for k in list(io):
            if k.startswith(("q", "k", "v", "out.")):
                io[k] = io[k][:, :, 1:2]
            elif k.startswith("block_map."):
                io[k] = io[k][:, 1:2]
        meta["config"]["H"] = 1

    copy_fixture(fixtures_dir, tmp_path, "dit_t2v", batch2)
    copy_fixture(fixtures_dir, tmp_path, "sla_attention", one_head)
    code, lines, _ = run(capsys, tmp_path)
    assert code == 0 and len(lines) == 1 + 4 and all(line.startswith("PASS") for line in lines)


def test_a_wrong_reference_fails(fixtures_dir, tmp_path, capsys):
    def nudge(meta, io):
        io["output"] = io["output"] * 1.001    # 1e-3 relative: ten times the tolerance
    copy_fixture(fixtures_dir, tmp_path, "dit_t2v", nudge)
    code, lines, err = run(capsys, tmp_path)
    assert code == 1 and lines[0].startswith("FAIL dit_t2v") and "1 failed" in err


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_no_fixtures_is_one_clear_line(tmp_path, capsys, make):
    target = tmp_path / "nowhere" if make == "missing" else tmp_path
    code, lines, err = run(capsys, target)
    assert code == 2 and not lines and len(err.strip().splitlines()) == 1
