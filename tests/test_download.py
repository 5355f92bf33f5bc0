"""Locating checkpoints and `turbo-repl download`, against a hub cache on disk and a stand-in hub on loopback.

Nothing here reaches the network: the CLI runs in a subprocess whose HF_ENDPOINT is the stand-in (which records
every request) and whose HF_HUB_CACHE / HF_HOME are temporary folders.
"""

from __future__ import annotations

import errno
import socket
import subprocess
from pathlib import Path

import pytest
from hub_helpers import FakeHub, content_of, put_in_cache, run_cli

from turbo_repl.models.download import explain
from turbo_repl.models.locate import MissingCheckpoint, NeededFile, locate, needed_files
from turbo_repl.models.registry import get_model, model_names

MODEL = "wan2.1-1.3b"
T2V = "TurboDiffusion/TurboWan2.1-T2V-1.3B-480P"
WAN = "Wan-AI/Wan2.1-T2V-1.3B"
TOKENIZER = "google/umt5-xxl"
TOKENIZER_FILES = list(get_model(MODEL).text_encoder.tokenizer["files"])
BF16_FILES = [(T2V, "TurboWan2.1-T2V-1.3B-480P.pth"), (WAN, "Wan2.1_VAE.pth"),
              (WAN, "models_t5_umt5-xxl-enc-bf16.pth")] + [(TOKENIZER, f) for f in TOKENIZER_FILES]
QUANT_DIT = (T2V, "TurboWan2.1-T2V-1.3B-480P-quant.pth")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache that this process's huggingface_hub reads (it reads HF_HUB_CACHE once, at import)."""
    from huggingface_hub import constants

    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    return path


@pytest.fixture
def hub():
    files = {key: content_of(*key) for key in BF16_FILES + [QUANT_DIT]}
    files[(TOKENIZER, "model.safetensors")] = b"50 GB of weights that must never be fetched"
    server = FakeHub(files)
    yield server
    server.close()


def cli(tmp_path: Path, *args: str, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess:
    return run_cli(tmp_path, *args, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1" if offline else "0",
                   HF_HUB_ETAG_TIMEOUT="5")


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


# --- locate -------------------------------------------------------------------------------------------------


def test_needed_files_are_the_registry_files_and_only_tokenizer_files_of_umt5():
    needs = needed_files(get_model(MODEL))
    assert [(n.repo, n.filename) for n in needs] == BF16_FILES
    quant = needed_files(get_model(MODEL), quant=True)
    assert (quant[0].repo, quant[0].filename) == QUANT_DIT
    i2v = needed_files(get_model("wan2.2-a14b-i2v"), quant=True)
    assert [n.role for n in i2v[:2]] == ["dit:high", "dit:low"]
    assert [n.filename for n in i2v[:2]] == ["TurboWan2.2-I2V-A14B-high-720P-quant.pth",
                                             "TurboWan2.2-I2V-A14B-low-720P-quant.pth"]
    assert needed_files(get_model("tiny")) == []


def test_locate_finds_every_file_in_the_hub_cache(cache):
    paths = {key: put_in_cache(cache, *key) for key in BF16_FILES}
    files = locate(MODEL)
    assert files.experts == {"main": paths[BF16_FILES[0]]}
    assert files.vae == paths[(WAN, "Wan2.1_VAE.pth")]
    assert files.text_encoder == paths[(WAN, "models_t5_umt5-xxl-enc-bf16.pth")]
    assert sorted(p.name for p in files.tokenizer.iterdir()) == sorted(TOKENIZER_FILES)
    assert files.vae.read_bytes() == content_of(WAN, "Wan2.1_VAE.pth")
    assert not files.quant and not files.builtin


def test_locate_quant_takes_the_quant_checkpoint(cache):
    for key in BF16_FILES[1:] + [QUANT_DIT]:
        put_in_cache(cache, *key)
    assert locate(MODEL, quant=True).experts["main"].name == QUANT_DIT[1]
    with pytest.raises(MissingCheckpoint) as e:   # the bf16 DiT was never put there
        locate(MODEL)
    assert [n.filename for n in e.value.missing] == [BF16_FILES[0][1]]


def test_locate_names_the_missing_files_and_the_command_to_fetch_them(cache):
    for key in BF16_FILES:
        if key not in [(WAN, "Wan2.1_VAE.pth"), (TOKENIZER, "spiece.model")]:
            put_in_cache(cache, *key)
    with pytest.raises(MissingCheckpoint) as e:
        locate(MODEL, quant=False)
    assert [n.hub_path for n in e.value.missing] == [f"{WAN}/Wan2.1_VAE.pth", f"{TOKENIZER}/spiece.model"]
    message = str(e.value)
    assert "\n" not in message
    assert f"{WAN}/Wan2.1_VAE.pth" in message and f"{TOKENIZER}/spiece.model" in message
    assert message.endswith("fetch them with: turbo-repl download wan2.1-1.3b")
    with pytest.raises(MissingCheckpoint, match="turbo-repl download wan2.1-1.3b --quant$"):
        locate(MODEL, quant=True)


def test_locate_reads_a_flat_checkpoint_folder_first(cache, tmp_path):
    folder = tmp_path / "checkpoints"
    for repo, name in BF16_FILES:
        path = folder / (f"{repo}/{name}" if repo == TOKENIZER else name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"from the folder")
    put_in_cache(cache, WAN, "Wan2.1_VAE.pth")     # the folder wins over the cache
    files = locate(MODEL, checkpoint_dir=folder)
    assert files.experts["main"] == folder / "TurboWan2.1-T2V-1.3B-480P.pth"
    assert files.vae == folder / "Wan2.1_VAE.pth"
    assert files.tokenizer == folder / "google" / "umt5-xxl"

    (folder / "Wan2.1_VAE.pth").unlink()          # a file the folder lacks comes from the cache
    assert locate(MODEL, checkpoint_dir=folder).vae.read_bytes() == content_of(WAN, "Wan2.1_VAE.pth")
    (folder / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    with pytest.raises(MissingCheckpoint, match=f"--checkpoint-dir {folder}$") as e:
        locate(MODEL, checkpoint_dir=folder)
    assert [n.filename for n in e.value.missing] == ["models_t5_umt5-xxl-enc-bf16.pth"]
    with pytest.raises(ValueError, match="does not exist"):
        locate(MODEL, checkpoint_dir=tmp_path / "nowhere")


def test_locate_takes_the_tokenizer_from_one_place_only(cache, tmp_path):
    """Half the tokenizer in the folder and half in the cache is not a tokenizer folder."""
    folder = tmp_path / "checkpoints"
    for key in BF16_FILES[:3]:
        put_in_cache(cache, *key)
    for name in TOKENIZER_FILES[:2]:
        (folder / TOKENIZER).mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER / name).write_bytes(b"tok")
    for name in TOKENIZER_FILES[2:]:
        put_in_cache(cache, TOKENIZER, name)
    with pytest.raises(MissingCheckpoint) as e:
        locate(MODEL, checkpoint_dir=folder)
    assert sorted(n.filename for n in e.value.missing) == sorted(TOKENIZER_FILES[2:])


def test_locate_builtin_model_needs_nothing(cache):
    files = locate("tiny")
    assert files.builtin and files.experts == {} and files.vae is None and files.tokenizer is None
    with pytest.raises(KeyError, match="known models: .*wan2.1-1.3b"):
        locate("wan9")


# --- download -----------------------------------------------------------------------------------------------


def test_download_fetches_exactly_the_needed_files_into_the_cache_then_nothing_more(tmp_path, hub, monkeypatch):
    result = cli(tmp_path, "download", MODEL, endpoint=hub.endpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"all {len(BF16_FILES)} files of 'wan2.1-1.3b' are here" in result.stdout
    assert sorted(hub.fetched()) == sorted(f"/{repo}/resolve/main/{name}" for repo, name in BF16_FILES)

    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    files = locate(MODEL)      # what was fetched is where locate looks, in huggingface_hub's own layout
    assert files.experts["main"].read_bytes() == content_of(*BF16_FILES[0])
    assert (files.tokenizer / "spiece.model").read_bytes() == content_of(TOKENIZER, "spiece.model")
    assert "snapshots" in files.vae.parts

    hub.requests.clear()
    again = cli(tmp_path, "download", MODEL, endpoint=hub.endpoint)
    assert again.returncode == 0 and hub.requests == []   # present files cost no request


def test_download_offline_reports_what_is_missing_and_asks_nothing(tmp_path, hub):
    for key in BF16_FILES[:-1]:
        put_in_cache(tmp_path / "hub", *key)
    result = cli(tmp_path, "download", MODEL, endpoint=hub.endpoint, offline=True)
    assert result.returncode == 1
    assert error_lines(result) == [f"error: {TOKENIZER}/special_tokens_map.json: not here, and HF_HUB_OFFLINE "
                                   "is set: unset it to download"]
    assert f"1 of {len(BF16_FILES)} files of 'wan2.1-1.3b' are missing" in result.stdout
    assert "turbo-repl download wan2.1-1.3b" in result.stdout
    assert hub.requests == []

    put_in_cache(tmp_path / "hub", *BF16_FILES[-1])
    complete = cli(tmp_path, "download", MODEL, endpoint=hub.endpoint, offline=True)
    assert complete.returncode == 0 and error_lines(complete) == [] and hub.requests == []


def test_download_dry_run_lists_sizes_and_fetches_nothing(tmp_path, hub):
    put_in_cache(tmp_path / "hub", *BF16_FILES[1])
    result = cli(tmp_path, "download", MODEL, "--quant", "--dry-run", endpoint=hub.endpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hub.fetched() == []
    assert {path for method, path in hub.requests} == {
        f"/{repo}/resolve/main/{name}" for repo, name in [QUANT_DIT] + BF16_FILES[2:]}
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 4}
    quant_row = rows[f"{T2V}/{QUANT_DIT[1]}"]
    assert f"{len(content_of(*QUANT_DIT))} B" in quant_row and "to fetch" in quant_row
    assert "present" in rows[f"{WAN}/Wan2.1_VAE.pth"]
    assert not list((tmp_path / "hub").glob(f"models--{T2V.replace('/', '--')}"))


def test_download_mirrors_into_a_checkpoint_folder_and_reuses_the_cache(tmp_path, hub, cache):
    put_in_cache(tmp_path / "hub", *BF16_FILES[2])     # the 11 GB encoder is already in the cache
    folder = tmp_path / "checkpoints"
    result = cli(tmp_path, "download", MODEL, "--checkpoint-dir", str(folder), endpoint=hub.endpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"/{WAN}/resolve/main/models_t5_umt5-xxl-enc-bf16.pth" not in hub.fetched()
    assert len(hub.fetched()) == len(BF16_FILES) - 1
    for repo, name in BF16_FILES:
        path = folder / (f"{repo}/{name}" if repo == TOKENIZER else name)
        assert path.read_bytes() == content_of(repo, name)
    files = locate(MODEL, checkpoint_dir=folder)
    assert files.tokenizer == folder / TOKENIZER and files.text_encoder.parent == folder


def test_download_explains_404_401_and_an_unreachable_hub_in_one_line_each(tmp_path, hub):
    del hub.files[(WAN, "Wan2.1_VAE.pth")]                                   # 404 EntryNotFound
    for name in TOKENIZER_FILES + ["model.safetensors"]:                      # 401 RepoNotFound
        del hub.files[(TOKENIZER, name)]
    result = cli(tmp_path, "download", MODEL, endpoint=hub.endpoint)
    assert result.returncode == 1
    lines = error_lines(result)
    assert lines[0] == f"error: {WAN}/Wan2.1_VAE.pth: {WAN} has no file Wan2.1_VAE.pth (HTTP 404)"
    assert lines[1:] == [f"error: {TOKENIZER}/{name}: repository {TOKENIZER} not found, or private and you are "
                         "not logged in (HTTP 401): check the name, or log in with `hf auth login` / set HF_TOKEN"
                         for name in TOKENIZER_FILES]
    assert f"{1 + len(TOKENIZER_FILES)} of {len(BF16_FILES)} files of 'wan2.1-1.3b' are missing" in result.stdout
    assert len(hub.fetched()) == 2    # the two files the hub has were still fetched

    with socket.socket() as s:        # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = cli(tmp_path / "other", "download", MODEL, endpoint=closed)
    assert down.returncode == 1
    lines = error_lines(down)
    assert len(lines) == len(BF16_FILES) and all(f"cannot reach {closed} (ConnectError)" in line for line in lines)


def test_download_refuses_when_the_disk_cannot_hold_the_files(tmp_path):
    hub = FakeHub({key: content_of(*key) for key in BF16_FILES}, sizes={BF16_FILES[0]: 10**18})
    try:
        result = cli(tmp_path, "download", MODEL, endpoint=hub.endpoint)
    finally:
        hub.close()
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"not enough disk space in {tmp_path / 'hub'}: the missing files "
                                            "need 1000000000.00 GB")
    assert hub.fetched() == []


def test_a_full_disk_during_a_transfer_reads_as_one_line():
    need = NeededFile("vae", WAN, "Wan2.1_VAE.pth", "Wan2.1_VAE.pth")
    line = explain(OSError(errno.ENOSPC, "No space left on device"), need)
    assert line.startswith("the disk is full") and "--checkpoint-dir" in line


def test_download_unknown_model_and_builtin_model(tmp_path, hub):
    unknown = cli(tmp_path, "download", "wan9", endpoint=hub.endpoint)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == f"unknown model 'wan9'; known models: {', '.join(model_names())}"
    tiny = cli(tmp_path, "download", "tiny", endpoint=hub.endpoint)
    assert tiny.returncode == 0 and "built in" in tiny.stdout
    assert hub.requests == []
