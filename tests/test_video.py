"""mp4 writing and reading with the real ffmpeg of imageio-ffmpeg; output paths; image loading."""

import json
import os
from datetime import datetime

import numpy as np
import pytest
import torch
from PIL import Image

from turbo_repl.video import Mp4Streams, VideoError, _ffmetadata, check_writable, frames_digest, load_image, \
    output_paths, read_frames, read_record, roundtrip, write_mp4


def smooth_frames(f=9, h=64, w=96, seed=0) -> np.ndarray:
    """Moving colour gradients: content H.264 keeps close to the original."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6.28, 3)
    frames = [np.stack([127 + 100 * np.sin(x / 17 + y / 23 + t / 3 + p) for p in phase], -1) for t in range(f)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


RECORD = {"id": "r1", "prompt": 'a fox; = # \\ "quoted"\nnext line, ünïcödé', "seed": 7, "settings": {"steps": 2}}


def test_mp4_round_trip_keeps_frames_and_embeds_the_record(tmp_path):
    frames = smooth_frames()
    path = tmp_path / "out" / "clip.mp4"
    write_mp4(frames, path, fps=16, record=RECORD)
    decoded = read_frames(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    assert read_record(path) == RECORD
    assert json.loads(path.with_suffix(".json").read_text()) == RECORD
    assert not list(path.parent.glob(".*partial"))


def test_writing_is_deterministic_so_a_roundtrip_matches_the_file(tmp_path):
    frames = smooth_frames(seed=1)
    write_mp4(frames, tmp_path / "a.mp4", fps=16)
    assert np.array_equal(roundtrip(frames, 16), read_frames(tmp_path / "a.mp4"))


def test_a_torch_tensor_writes_like_an_array(tmp_path):
    frames = smooth_frames(seed=2)
    write_mp4(torch.from_numpy(frames), tmp_path / "t.mp4", fps=8)
    assert read_frames(tmp_path / "t.mp4").shape == frames.shape


def test_frames_digest_is_over_the_exact_bytes():
    frames = smooth_frames()
    assert frames_digest(frames) == frames_digest(torch.from_numpy(frames))
    changed = frames.copy()
    changed[3, 10, 10, 1] ^= 1
    assert frames_digest(changed) != frames_digest(frames)


def test_bad_frames_are_refused(tmp_path):
    with pytest.raises(VideoError, match="uint8"):
        write_mp4(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "x.mp4", 16)
    with pytest.raises(VideoError, match="even width and height"):
        write_mp4(np.zeros((2, 9, 8, 3), np.uint8), tmp_path / "x.mp4", 16)


def test_a_video_without_a_record_says_so(tmp_path):
    write_mp4(smooth_frames(f=3), tmp_path / "plain.mp4", 16)
    with pytest.raises(VideoError, match="carries no turbo-repl run record"):
        read_record(tmp_path / "plain.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="cannot read"):
        read_record(tmp_path / "junk.mp4")
    with pytest.raises(VideoError, match="no such file"):
        read_record(tmp_path / "missing.mp4")


def test_ffmetadata_unescaping():
    text = ";FFMETADATA1\nmajor_brand=isom\ncomment={\"a\": \"x\\=y\\;z\\#w\\\\\\\\v\\\nnext\"}\n"
    assert _ffmetadata(text) == {"major_brand": "isom", "comment": '{"a": "x=y;z#w\\\\v\nnext"}'}


def test_output_paths_never_overwrite(tmp_path):
    template = str(tmp_path / "{date}" / "{time}-{seed}-{slug}.mp4")
    when = datetime(2025, 1, 2, 3, 4, 5)
    first = output_paths(template, samples=1, seed=7, prompt="A Fox, in the SNOW!", model="tiny", run_id="r",
                         when=when)
    assert first == [tmp_path / "2025-01-02" / "030405-7-a-fox-in-the-snow.mp4"]
    first[0].parent.mkdir()
    first[0].write_bytes(b"earlier video")
    again = output_paths(template, samples=1, seed=7, prompt="A Fox, in the SNOW!", model="tiny", run_id="r",
                         when=when)
    assert again == [tmp_path / "2025-01-02" / "030405-7-a-fox-in-the-snow-1.mp4"]
    several = output_paths(template, samples=3, seed=7, prompt="x", model="tiny", run_id="r", when=when)
    assert [p.name for p in several] == ["030405-7-x-s0.mp4", "030405-7-x-s1.mp4", "030405-7-x-s2.mp4"]
    named = output_paths(str(tmp_path / "{model}-{id}-{sample}"), samples=2, seed=1, prompt="", model="tiny",
                         run_id="ab", when=when)
    assert [p.name for p in named] == ["tiny-ab-0.mp4", "tiny-ab-1.mp4"]


def test_an_unwritable_output_folder_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(VideoError) as e:
        check_writable(blocker / "sub" / "x.mp4")
    assert str(e.value).startswith(f"cannot write {blocker / 'sub'}:") and "\n" not in str(e.value)
    assert "choose another place with :set output PATH" in str(e.value)
    with pytest.raises(VideoError, match="cannot write"):
        write_mp4(smooth_frames(f=2), blocker / "x.mp4", 16)


def test_load_image(tmp_path):
    Image.fromarray(smooth_frames(f=1)[0]).save(tmp_path / "ok.png")
    Image.fromarray(smooth_frames(f=1)[0][..., 0]).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "ok.png").shape == (64, 96, 3)
    assert load_image(tmp_path / "grey.png").shape == (64, 96, 3)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(VideoError, match="is not an image PIL can read"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(VideoError, match="no such image"):
        load_image(tmp_path / "none.png")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to simulate a full disk")
def test_a_full_disk_is_one_clear_line_and_leaves_no_file(tmp_path):
    target = tmp_path / "clip.mp4"
    (tmp_path / ".clip.mp4.partial").symlink_to("/dev/full")   # every write ffmpeg makes there fails: ENOSPC
    with pytest.raises(VideoError) as e:
        write_mp4(smooth_frames(f=3), target, 16, record=RECORD)
    assert str(e.value) == f"cannot write {target}: the disk is full; free some space or :set output to another disk"
    assert not target.exists() and not target.with_suffix(".json").exists()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_streamed_encoding_gives_the_file_a_whole_write_gives(tmp_path):
    """Two samples fed in chunks while they are made: the same decoded frames as writing them whole, the record
    in each file, nothing left behind."""
    samples = np.stack([smooth_frames(seed=0), smooth_frames(seed=1)])        # [2, 9, 64, 96, 3]
    paths = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    streams = Mp4Streams(paths, fps=16)
    for start, stop in ((0, 1), (1, 5), (5, 9)):
        streams.write(samples[:, start:stop])
    records = [{**RECORD, "sample": i} for i in range(2)]
    streams.finish(samples, records)
    for i, path in enumerate(paths):
        whole = tmp_path / f"whole-{i}.mp4"
        write_mp4(samples[i], whole, fps=16)
        assert np.array_equal(read_frames(path), read_frames(whole))
        assert read_record(path) == records[i]
        assert json.loads(path.with_suffix(".json").read_text()) == records[i]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["discarded", "short"])
def test_a_stream_that_cannot_be_used_falls_back_to_a_whole_write(tmp_path, how):
    samples = smooth_frames()[None]
    streams = Mp4Streams([tmp_path / "a.mp4"], fps=16)
    streams.write(samples[:, :5])
    if how == "discarded":       # the decode started over in tiles
        streams.discard()
        streams.write(samples[:, 5:])
    streams.finish(samples, [RECORD])
    assert read_frames(tmp_path / "a.mp4").shape == samples[0].shape
    assert read_record(tmp_path / "a.mp4") == RECORD
    assert _leftovers(tmp_path) == []


def test_an_aborted_stream_leaves_nothing(tmp_path):
    streams = Mp4Streams([tmp_path / "a.mp4", tmp_path / "b.mp4"], fps=16)
    streams.write(np.stack([smooth_frames(f=5)] * 2))
    streams.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_streaming_is_one_clear_line_and_leaves_no_file(tmp_path):
    target = tmp_path / "clip.mp4"
    (tmp_path / ".clip.mp4.stream").symlink_to("/dev/full")   # the streamed encode's writes fail: ENOSPC
    frames = smooth_frames(f=5)[None]
    streams = Mp4Streams([target], fps=16)
    streams.write(frames)
    with pytest.raises(VideoError) as e:
        streams.finish(frames, [RECORD])
    assert str(e.value) == f"cannot write {target}: the disk is full; free some space or :set output to another disk"
    assert not target.exists() and not target.with_suffix(".json").exists()
    assert _leftovers(tmp_path) == []
