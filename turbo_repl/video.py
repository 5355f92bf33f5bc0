"""Video files: mp4 writing with the run record embedded, reading it back, output paths, image loading.

mp4s are H.264 / yuv420p written by the ffmpeg that imageio-ffmpeg ships. The run record goes into the
mp4's `comment` tag and beside it as a sidecar `.json`; `read_record` gets it back with that same ffmpeg
(`-f ffmetadata`), since ffprobe is not shipped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import subprocess
import tempfile
import threading
from datetime import datetime
from pathlib import Path

import numpy as np

CRF = 17   # x264 quality: visually lossless
PRESET = "veryfast"   # 2-3x faster than x264's default (medium) at about the same size for this quality


class VideoError(ValueError):
    """A video or image could not be written or read; one line saying what and what to do."""


def frames_digest(frames) -> str:
    """sha256 of the decoded uint8 frames (a torch tensor or numpy array), as hex."""
    array = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (the I2V input image), as hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- output paths ------------------------------------------------------------------------------------------

def slug(prompt: str, words: int = 6) -> str:
    return "-".join(re.findall(r"[a-z0-9]+", prompt.lower())[:words])[:48] or "video"


def output_paths(template: str, *, samples: int, seed: int, prompt: str, model: str, run_id: str,
                 when: datetime | None = None) -> list[Path]:
    """One new path per sample; a path that exists gets a counter (`-1`, `-2`, …) and is never overwritten."""
    when = when or datetime.now()
    fields = dict(date=when.strftime("%Y-%m-%d"), time=when.strftime("%H%M%S"), seed=seed, slug=slug(prompt),
                  model=model, id=run_id)
    paths = []
    for sample in range(samples):
        text = template.format(sample=sample, **fields)
        if samples > 1 and "{sample}" not in template:
            stem, dot, ext = text.rpartition(".") if "." in Path(text).name else (text, "", "")
            text = f"{stem}-s{sample}{dot}{ext}"
        path = Path(text).expanduser()
        if path.suffix.lower() != ".mp4":
            path = path.with_name(path.name + ".mp4")
        candidate, n = path, 0
        while candidate.exists() or candidate in paths or candidate.with_suffix(".json").exists():
            n += 1
            candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        paths.append(candidate)
    return paths


def check_writable(path: Path) -> None:
    """Make the folder of `path` and make sure a file can be created there, before any work is spent."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".turbo-repl-probe-"):
            pass
    except OSError as e:
        raise VideoError(_os_message(folder, e)) from None


def _os_message(path: Path, e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return f"cannot write {path}: the disk is full; free some space or :set output to another disk"
    return f"cannot write {path}: {e.strerror or e}; choose another place with :set output PATH"


# --- mp4 -----------------------------------------------------------------------------------------------------

def write_mp4(frames, path: Path, fps: int, record: dict | None = None) -> None:
    """Write uint8 frames [F, H, W, 3] to an H.264 mp4 with `record` in its comment tag and a sidecar .json.

    The file appears complete or not at all: ffmpeg writes a hidden partial file that is renamed at the end.
    """
    array = _frames_array(frames)
    f, h, w, _ = array.shape
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    command = _encode_command(w, h, fps) + _metadata(record) + ["-f", "mp4", str(partial)]
    with _cleaned_up_on_error(partial, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, input=np.ascontiguousarray(array).tobytes(), capture_output=True)
        _check_ffmpeg(result.returncode, result.stderr, path)
        _put_in_place(partial, path, record)


class Mp4Stream:
    """One sample's mp4, encoded while its frames are still being made: chunks of uint8 frames go to ffmpeg from a
    feeder thread, so the producer never waits on the encoder. `finish(record)` adds the record as metadata (a
    stream copy, no re-encode) and puts the file in place; `abort()` leaves nothing behind."""

    def __init__(self, path: Path, width: int, height: int, fps: int):
        self.path = Path(path)
        self.frames = 0
        self._encoded = self.path.with_name(f".{self.path.name}.stream")
        if height % 2 or width % 2:
            raise VideoError(f"H.264 yuv420p needs an even width and height, got {width}×{height}")
        command = _encode_command(width, height, fps) + ["-f", "mp4", str(self._encoded)]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE)
        except OSError as e:
            raise VideoError(_os_message(self.path, e)) from None
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._feeder = threading.Thread(target=self._feed, name="turbo-repl-mp4", daemon=True)
        self._feeder.start()

    def write(self, frames) -> None:
        array = _frames_array(frames)
        self.frames += array.shape[0]
        self._chunks.put(np.ascontiguousarray(array).tobytes())

    def _feed(self) -> None:
        try:
            while (chunk := self._chunks.get()) is not None:
                self._process.stdin.write(chunk)
        except OSError:   # ffmpeg stopped early: its exit status and message tell why, in finish()
            pass
        finally:
            with contextlib.suppress(OSError):
                self._process.stdin.close()

    def finish(self, record: dict | None) -> None:
        self._chunks.put(None)
        self._feeder.join()
        stderr = self._process.stderr.read()
        self._process.wait()
        partial = self.path.with_name(f".{self.path.name}.partial")
        try:
            with _cleaned_up_on_error(partial, self.path):
                _check_ffmpeg(self._process.returncode, stderr, self.path)
                copy = [_ffmpeg(), "-y", "-v", "error", "-i", str(self._encoded), "-map", "0", "-c", "copy"]
                result = subprocess.run(copy + _metadata(record) + ["-f", "mp4", str(partial)], capture_output=True)
                _check_ffmpeg(result.returncode, result.stderr, self.path)
                _put_in_place(partial, self.path, record)
        finally:
            _remove(self._encoded)

    def abort(self) -> None:
        self._chunks.put(None)
        self._process.kill()
        self._feeder.join()
        self._process.wait()
        self._process.stderr.close()
        _remove(self._encoded)


class Mp4Streams:
    """The mp4s of a run's samples, encoded while the VAE decodes: `write(chunk)` takes uint8 [samples, F, H, W, 3]
    as frames are made; `discard()` gives up streaming (the files are then written whole by `finish`)."""

    def __init__(self, paths: list[Path], fps: int):
        self.paths, self.fps = paths, fps
        self.streams: list[Mp4Stream] | None = None
        self.discarded = False

    def write(self, chunk) -> None:
        if self.discarded:
            return
        if self.streams is None:
            _, _, height, width, _ = chunk.shape
            self.streams = []
            try:
                for path in self.paths:
                    self.streams.append(Mp4Stream(path, width, height, self.fps))
            except VideoError:
                self.discard()   # finish() will say what is wrong when it writes the files whole
                return
        for stream, frames in zip(self.streams, chunk):
            stream.write(frames)

    def discard(self) -> None:
        self.discarded = True
        self.abort()

    def finish(self, frames, records: list[dict]) -> None:
        """Put every sample's file in place: the streamed encode when it received all of `frames` [samples, F,
        H, W, 3], else an encode of `frames` now."""
        streamed = not self.discarded and self.streams is not None and all(
            s.frames == frames.shape[1] for s in self.streams)
        if not streamed:
            self.abort()
        for i, (path, record) in enumerate(zip(self.paths, records)):
            if streamed:
                self.streams[i].finish(record)
            else:
                write_mp4(frames[i], path, self.fps, record)
        self.streams = None

    def abort(self) -> None:
        for stream in self.streams or []:
            stream.abort()
        self.streams = None


def _frames_array(frames) -> np.ndarray:
    array = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise VideoError(f"frames must be uint8 [F, H, W, 3], got {array.dtype} {list(array.shape)}")
    if array.shape[1] % 2 or array.shape[2] % 2:
        raise VideoError(f"H.264 yuv420p needs an even width and height, got {array.shape[2]}×{array.shape[1]}")
    return array


def _encode_command(width: int, height: int, fps: int) -> list[str]:
    return [_ffmpeg(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-r", str(fps), "-i", "-", "-an", "-c:v", "libx264", "-preset", PRESET, "-pix_fmt", "yuv420p",
            "-crf", str(CRF)]


def _metadata(record: dict | None) -> list[str]:
    if record is None:
        return []
    return ["-metadata", "comment=" + json.dumps(record, ensure_ascii=False, separators=(",", ":"))]


def _check_ffmpeg(returncode: int, stderr: bytes, path: Path) -> None:
    if returncode != 0:
        reason = stderr.decode(errors="replace").strip().splitlines() or ["ffmpeg failed"]
        if any("No space left" in line for line in reason):
            raise OSError(errno.ENOSPC, "No space left on device")
        raise VideoError(f"cannot write {path}: {reason[-1]}")


@contextlib.contextmanager
def _cleaned_up_on_error(partial: Path, path: Path):
    """Remove the partial file of `path` if writing it fails; an OSError becomes the one-line VideoError."""
    try:
        yield
    except OSError as e:
        _remove(partial)
        raise VideoError(_os_message(path, e)) from None
    except VideoError:
        _remove(partial)
        raise


def _put_in_place(partial: Path, path: Path, record: dict | None) -> None:
    os.replace(partial, path)
    if record is not None:
        path.with_suffix(".json").write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def read_frames(path: Path) -> np.ndarray:
    """Decoded frames of a video file, uint8 [F, H, W, 3]."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(data, np.uint8).reshape(h, w, 3) for data in reader]
    except (OSError, RuntimeError, StopIteration) as e:
        raise VideoError(f"cannot read video {path}: {str(e).strip().splitlines()[-1] if str(e) else e}") from None
    return np.stack(frames)


def roundtrip(frames, fps: int) -> np.ndarray:
    """`frames` as they come back from an mp4 written by `write_mp4` (to compare with a decoded file)."""
    with tempfile.TemporaryDirectory(prefix="turbo-repl-") as tmp:
        path = Path(tmp) / "roundtrip.mp4"
        write_mp4(frames, path, fps)
        return read_frames(path)


def read_record(path: Path) -> dict:
    """The run record embedded in an mp4 made by turbo-repl."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    result = subprocess.run([_ffmpeg(), "-v", "error", "-i", str(path), "-f", "ffmetadata",
                             "-"], capture_output=True)
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise VideoError(f"cannot read {path}: {reason[-1] if reason else 'not a video'}")
    comment = _ffmetadata(result.stdout.decode("utf-8", errors="replace")).get("comment")
    try:
        record = json.loads(comment) if comment else None
    except ValueError:
        record = None
    if not isinstance(record, dict) or "prompt" not in record:
        raise VideoError(f"{path} carries no turbo-repl run record (was it made by turbo-repl?)")
    return record


def _ffmetadata(text: str) -> dict[str, str]:
    """Parse ffmpeg's ffmetadata output: key=value lines where `=;#\\` and newlines are backslash-escaped."""
    tags: dict[str, str] = {}
    key, value, escaped, in_value = [], [], False, False
    for ch in text + "\n":
        if escaped:
            (value if in_value else key).append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "=" and not in_value:
            in_value = True
        elif ch == "\n":
            name = "".join(key)
            if in_value and not name.startswith(";") and not name.startswith("["):
                tags[name.lower()] = "".join(value)
            key, value, in_value = [], [], False
        else:
            (value if in_value else key).append(ch)
    return tags


# --- images --------------------------------------------------------------------------------------------------

def load_image(path: str | Path) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3], or VideoError naming the file and the problem."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise VideoError(f"no such image: {path}") from None
    except UnidentifiedImageError:
        raise VideoError(f"{path} is not an image PIL can read (use PNG, JPEG or WebP)") from None
    except OSError as e:
        raise VideoError(f"cannot read image {path}: {e.strerror or e}") from None
