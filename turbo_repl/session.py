"""The working session the REPL, `turbo-repl run` and `replay` share: one loaded engine, the current
settings, and the history file every run is recorded in.

    session = Session(engine, "tiny", history=History(path))
    session.set("seed", "42")
    record = session.run("a fox in the snow", progress, cancel)   # writes the mp4(s), completes the record
    verdict = session.replay(record)                               # regenerates, compares the frames
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from turbo_repl.engine.types import Cancelled, Request
from turbo_repl.history import History, new_run_id, now
from turbo_repl.settings import Settings, SettingError, lookup
from turbo_repl.video import Mp4Streams, VideoError, check_writable, file_digest, frames_digest, load_image, \
    output_paths, read_frames, roundtrip

ProgressFn = Callable[[str, int, int], None]


class RunError(Exception):
    """A run could not be made; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class Verdict:
    """How a replayed run compares with its record."""

    run_id: str
    status: str                 # identical | differs | failed | cancelled | unchecked (no recorded hash)
    detail: str = ""
    max_abs_diff: int | None = None
    fraction_differing: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("identical", "unchecked")


class Session:
    def __init__(self, engine, model: str, history: History, defaults: Settings | None = None):
        self.engine = engine
        self.model = model
        self.history = history
        self.defaults = defaults if defaults is not None else Settings.defaults(model)
        self.settings = self.defaults
        self.runs: list[dict] = []            # this session's records, for :save

    # --- settings ---------------------------------------------------------------------------------------

    def set(self, name: str, text: str) -> str:
        """Change one setting (validated; nothing changes on error). Returns its canonical name."""
        settings = self.settings.with_value(name, text)
        if lookup(name).name == "image" and settings.image is not None:
            load_image(settings.image)   # an unreadable image is refused now, not at the next run
        self.settings = settings
        return lookup(name).name

    def reset(self, name: str | None = None) -> None:
        if name is None:
            self.settings = self.defaults
        else:
            setting = lookup(name)
            self.settings = self.settings.with_value(setting.name, getattr(self.defaults, setting.name))

    # --- runs -------------------------------------------------------------------------------------------

    def run(self, prompt: str, progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> dict:
        """Generate, write the video(s) and record the run. Raises RunError (recorded as failed when the run
        had started) or Cancelled (recorded as cancelled)."""
        prompt = prompt.strip()
        if not prompt:
            raise RunError("the prompt is empty")
        settings = self.settings
        self._check_inputs(settings)
        drawn = settings.seed == "random"
        seed = secrets.randbelow(2**31) if drawn else settings.seed
        settings = settings.with_value("seed", seed)
        run_id = new_run_id()
        record = {"id": run_id, "prompt": prompt, "model": self.model, "seed": seed, "seed_drawn": drawn,
                  "settings": settings.to_dict(), "versions": self._versions()}
        if settings.image is not None:
            record["image_sha256"] = file_digest(settings.image)
        record.update(self.history.start(record))
        try:
            paths = output_paths(settings.output, samples=settings.samples, seed=seed, prompt=prompt,
                                 model=self.model, run_id=run_id)
            check_writable(paths[0])
            # the mp4s are encoded while the VAE decodes; the record goes in when the run is done
            streams = Mp4Streams(paths, settings.fps)
            try:
                video = self.engine.generate(Request(prompt, settings, seed), progress or _quiet,
                                             cancel or _NEVER, frames_sink=streams)
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                info = {k: v for k, v in video.info.items() if k != "versions"}   # versions: recorded on their own
                record.update(frames_sha256=frames_digest(video.frames), frames_shape=list(video.frames.shape),
                              info=_jsonable(info), outputs=[str(p) for p in paths])
                timings = dict(video.timings)
                start = time.perf_counter()
                if progress:
                    progress("writing", 0, len(paths))
                streams.finish(video.frames, [{**record, "status": "finished", "sample": i}
                                              for i in range(len(paths))])
            except BaseException:
                streams.abort()
                raise
            if progress:
                progress("writing", len(paths), len(paths))
            timings["write"] = time.perf_counter() - start
            record["timings"] = {k: round(v, 4) for k, v in timings.items()}
        except Cancelled:
            self._end(record, "cancelled")
            raise
        except (VideoError, OSError) as e:
            self._end(record, "failed", error=str(e))
            raise RunError(str(e)) from None
        except BaseException as e:
            self._end(record, "failed", error=f"{type(e).__name__}: {e}")
            raise
        self._end(record, "finished")
        return record

    def _end(self, record: dict, status: str, **fields) -> None:
        keys = ("outputs", "frames_sha256", "frames_shape", "timings", "info")
        fields.update({k: record[k] for k in keys if k in record})
        record.update(status=status, **fields)
        self.history.end(record["id"], status, **fields)
        record["ended"] = now()
        self.runs.append(record)

    def _check_inputs(self, settings: Settings) -> None:
        """Refuse a run that cannot work before it is recorded (the engine checks the same, later)."""
        from turbo_repl.models.registry import get_model

        task = get_model(self.model).task
        if task == "i2v" and settings.image is None:
            raise RunError(f"{self.model} makes video from an image: give one with :image PATH")
        if task == "t2v" and settings.image is not None:
            raise RunError(f"{self.model} makes video from text only: clear the image with :image none")
        if settings.image is not None:
            try:
                load_image(settings.image)
            except VideoError as e:
                raise RunError(str(e)) from None

    def _versions(self) -> dict:
        info = getattr(self.engine, "info", {})
        return _jsonable({**info.get("versions", {}), "gpu": info.get("gpu"), "cpu": info.get("cpu")})

    # --- replay -----------------------------------------------------------------------------------------

    def replay(self, record: dict, progress: ProgressFn | None = None,
               cancel: threading.Event | None = None) -> Verdict:
        """Regenerate a recorded run and compare its frames with the record's hash (and video, if on disk)."""
        run_id = str(record.get("id", "?"))
        model = record.get("model", self.model)
        if model != self.model:
            return Verdict(run_id, "failed", f"made with model {model}; this session runs {self.model} "
                                             f"(`turbo-repl replay` loads the right one)")
        try:
            settings = Settings.from_dict(record.get("settings") or {}, base=Settings.defaults(model))
            seed = record.get("seed", settings.seed)
            if seed == "random":
                seed = secrets.randbelow(2**31)
            settings = settings.with_value("seed", seed)
            self._check_inputs(settings)
            if record.get("image_sha256") and file_digest(settings.image) != record["image_sha256"]:
                raise RunError(f"{settings.image} is not the image this run was made from (its sha256 differs)")
            video = self.engine.generate(Request(record["prompt"], settings, int(seed)), progress or _quiet,
                                         cancel or _NEVER)
        except Cancelled:
            return Verdict(run_id, "cancelled", "cancelled")
        except (SettingError, RunError) as e:
            return Verdict(run_id, "failed", str(e))
        except Exception as e:   # noqa: BLE001 - a replay reports every failure and goes on with the next run
            return Verdict(run_id, "failed", f"{type(e).__name__}: {e}")
        return compare(record, video.frames, settings.fps)


def compare(record: dict, frames, fps: int) -> Verdict:
    """Regenerated frames against a record: identical iff the frame hashes match; otherwise by how much."""
    run_id = str(record.get("id", "?"))
    expected = record.get("frames_sha256")
    if not expected:
        return Verdict(run_id, "unchecked", "no frames hash recorded; nothing to compare with")
    if frames_digest(frames) == expected:
        return Verdict(run_id, "identical", "frames identical (sha256)")
    shape = list(frames.shape)
    if record.get("frames_shape") and record["frames_shape"] != shape:
        return Verdict(run_id, "differs", f"frames shape {shape} instead of {record['frames_shape']}")
    originals = [Path(p) for p in record.get("outputs") or []]
    if not originals or not all(p.is_file() for p in originals):
        return Verdict(run_id, "differs", "frames hash differs (the recorded video is not on disk to measure by "
                                          "how much)")
    # Compare like with like: the recorded mp4 against the new frames sent through the same encoder.
    max_diff, differing, total = 0, 0, 0
    for sample, path in enumerate(originals):
        old = read_frames(path).astype(int)
        new = roundtrip(frames[sample], fps).astype(int)
        if old.shape != new.shape:
            return Verdict(run_id, "differs", f"{path} has shape {list(old.shape)}, regenerated {list(new.shape)}")
        diff = abs(old - new).max(axis=-1)
        max_diff = max(max_diff, int(diff.max()))
        differing += int((diff > 0).sum())
        total += diff.size
    fraction = differing / total
    return Verdict(run_id, "differs", f"frames hash differs; after H.264: max abs difference {max_diff}/255, "
                                      f"{fraction * 100:.3g}% of pixels differ", max_diff, fraction)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return str(value)   # also plain-str copies of str subclasses (torch's version string), for YAML


def _quiet(stage: str, done: int, total: int) -> None:
    pass


class _Never:
    def is_set(self) -> bool:
        return False


_NEVER = _Never()
