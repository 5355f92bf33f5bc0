"""THE table of generation settings: name, type, range or choices, default, aliases and help.

Everything that names a setting reads this table: the `Settings` value the engine gets, `:set` validation,
completion, `:help`, `:show`, the `--set NAME=VALUE` flags, history records and session files. TurboDiffusion's
flag names are accepted as aliases, so `:set num_steps 2` works like `:set steps 2`.

    s = Settings.defaults("tiny").with_value("steps", "2")     # raises SettingError with one clear line
"""

from __future__ import annotations

import dataclasses
import difflib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class SettingError(ValueError):
    """A setting name or value was refused; the message is one line that says what to do."""


# (width, height) per resolution and aspect ratio: the reference's VIDEO_RES_SIZE_INFO plus the tiny model's 128p.
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640), "16:9": (832, 480), "9:16": (480, 832)},
    "720p": {"1:1": (960, 960), "4:3": (960, 720), "3:4": (720, 960), "16:9": (1280, 720), "9:16": (720, 1280)},
    "720": {"1:1": (960, 960), "4:3": (960, 704), "3:4": (704, 960), "16:9": (1280, 704), "9:16": (704, 1280)},
    "512": {"1:1": (512, 512), "4:3": (640, 512), "3:4": (512, 640), "16:9": (640, 384), "9:16": (384, 640)},
    "480": {"1:1": (480, 480), "4:3": (640, 480), "3:4": (480, 640), "16:9": (768, 432), "9:16": (432, 768)},
    "128p": {"1:1": (160, 160), "4:3": (192, 144), "3:4": (144, 192), "16:9": (224, 128), "9:16": (128, 224)},
}
ASPECTS = ("16:9", "9:16", "1:1", "4:3", "3:4")

# Placeholders an output template may use (filled by turbo_repl.video.output_paths).
OUTPUT_FIELDS = ("date", "time", "seed", "slug", "model", "id", "sample")
DEFAULT_OUTPUT = "outputs/{date}/{time}-{seed}-{slug}.mp4"

_TRUE = ("on", "true", "yes", "1")
_FALSE = ("off", "false", "no", "0")
_NONE = ("", "none", "off")


def resolution_size(resolution: str, aspect: str) -> tuple[int, int]:
    """(width, height) of a resolution key and aspect ratio."""
    try:
        return RESOLUTIONS[resolution][aspect]
    except KeyError:
        raise SettingError(f"no size for resolution {resolution!r} at aspect {aspect!r}") from None


# --- parsers: text -> value, raising SettingError(reason) --------------------------------------------------

def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise SettingError(f"{text!r} is not a whole number") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise SettingError(f"{value} is out of range {_span(lo, hi)}")
        return value
    return parse


def _float(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise SettingError(f"{text!r} is not a number") from None
        too_low = value <= lo if lo_open else value < lo
        if value != value or too_low or (hi is not None and value > hi):   # value != value: NaN
            raise SettingError(f"{text.strip()} is out of range {_span(lo, hi, lo_open)}")
        return value
    return parse


def _span(lo, hi, lo_open=False) -> str:
    lo, hi = (f"{v:g}" if v is not None else None for v in (lo, hi))
    if hi is None:
        return f"{'>' if lo_open else '≥'} {lo}"
    return f"{lo} < x ≤ {hi}" if lo_open else f"{lo}–{hi}"


def _choice(choices: tuple[str, ...], synonyms: dict[str, str] | None = None) -> Callable[[str], str]:
    def parse(text: str) -> str:
        key = text.strip().lower()
        key = (synonyms or {}).get(key, key)
        if key not in choices:
            raise SettingError(f"{text.strip()!r} is not one of {', '.join(choices)}")
        return key
    return parse


def _bool(text: str) -> bool:
    key = text.strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    raise SettingError(f"{text.strip()!r} is not on or off")


def _seed(text: str) -> int | str:
    if text.strip().lower() == "random":
        return "random"
    try:
        return _int(0, 2**63 - 1)(text)
    except SettingError:
        raise SettingError(f"{text.strip()!r} is not a whole number ≥ 0 or 'random'") from None


def _frames(text: str) -> int:
    value = _int(1)(text)
    if value % 4 != 1:
        below = value - (value - 1) % 4
        raise SettingError(f"{value} is not of the form 4k+1; try {below} or {below + 4}")
    return value


def _image(text: str) -> str | None:
    path = text.strip()
    if path.lower() in _NONE:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise SettingError(f"no such file: {path}")
    return str(p)


def _template(text: str) -> str:
    template = text.strip()
    if not template:
        raise SettingError("the output template is empty")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise SettingError(f"bad output template: {e}") from None
    unknown = [f for f in fields if f not in OUTPUT_FIELDS]
    if unknown:
        known = " ".join("{" + f + "}" for f in OUTPUT_FIELDS)
        raise SettingError(f"unknown placeholder {{{unknown[0]}}} in the output template; use {known}")
    return template


# --- the table ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    name: str
    type: type | str              # the python type of the value, for the Settings attribute
    parse: Callable[[str], Any]   # text -> value; raises SettingError
    default: Any
    help: str
    range: str = ""               # shown in :help when there are no choices
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    path: bool = False            # the value is a file path (completion offers files)

    def coerce(self, value: Any) -> Any:
        """A value from text, or from a typed value (session files, model defaults)."""
        if value is None:
            value = "none"
        elif isinstance(value, bool):
            value = "on" if value else "off"
        return self.parse(str(value))

    @property
    def values(self) -> str:
        """The accepted values, as :help shows them."""
        return self.range or " ".join(self.choices)

    def text(self, value: Any) -> str:
        """How a value is typed: the inverse of `parse`."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if value is None:
            return "none"
        return str(value)


TABLE: tuple[Setting, ...] = (
    Setting("seed", "int | str", _seed, "random",
            "noise seed; 'random' draws a fresh one per run and records it", "int ≥ 0 or random",
            choices=("random",)),
    Setting("steps", int, _int(1, 4), 4, "sampling steps (rCM: 1–4)", "1–4",
            choices=("1", "2", "3", "4"), aliases=("num_steps",)),
    Setting("topk", float, _float(0.0, 1.0, lo_open=True), 0.1,
            "fraction of key blocks sparse attention keeps (0.15 for more quality)", "0 < x ≤ 1",
            aliases=("sla_topk",)),
    Setting("ode", bool, _bool, False,
            "deterministic ODE sampling (sharper, less robust) instead of SDE; offered for text-to-video too, "
            "where the reference scripts allow only SDE", "on/off",
            choices=("on", "off")),
    Setting("resolution", str, _choice(tuple(RESOLUTIONS)), "480p", "size class; with aspect gives width × height",
            choices=tuple(RESOLUTIONS)),
    Setting("aspect", str, _choice(ASPECTS), "16:9", "aspect ratio width:height", choices=ASPECTS,
            aliases=("aspect_ratio",)),
    Setting("frames", int, _frames, 81, "number of frames (4k+1: 17, 33, 49, 65, 81, …)", "4k+1",
            aliases=("num_frames",)),
    Setting("sigma_max", float, _float(0.0, lo_open=True), 80.0,
            "initial noise level (80 text-to-video, 200 image-to-video)", "> 0"),
    Setting("samples", int, _int(1), 1, "videos per prompt, one file each", "≥ 1", aliases=("num_samples",)),
    Setting("attention", str, _choice(("auto", "sagesla", "sla", "original")), "auto",
            "self-attention backend; auto picks the fastest that works here",
            choices=("auto", "sagesla", "sla", "original"), aliases=("attention_type",)),
    Setting("quant", str, _choice(("auto", "int8", "fp8", "off"), {"on": "int8", "true": "int8", "yes": "int8",
                                                                    "false": "off", "no": "off"}),
            "auto", "8-bit linear layers; auto keeps what the checkpoint holds (int8 for -quant files, else off)", choices=("auto", "int8", "fp8", "off"),
            aliases=("quant_linear",)),
    Setting("boundary", float, _float(0.0, 1.0), 0.9,
            "image-to-video: noise level at which the low-noise expert takes over", "0–1"),
    Setting("adaptive", bool, _bool, False, "image-to-video: fit the size to the image's aspect ratio", "on/off",
            choices=("on", "off"), aliases=("adaptive_resolution",)),
    Setting("image", "str | None", _image, None, "first frame for image-to-video ('none' to clear)", "path",
            aliases=("image_path",), path=True),
    Setting("fps", int, _int(1, 240), 16, "frames per second of the mp4", "1–240"),
    Setting("output", str, _template, DEFAULT_OUTPUT,
            "mp4 path template: " + " ".join("{" + f + "}" for f in OUTPUT_FIELDS) + "; never overwrites",
            "path template", aliases=("save_path",), path=True),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in TABLE}
_BY_ALIAS: dict[str, Setting] = {a: s for s in TABLE for a in (s.name, *s.aliases)}


def lookup(name: str) -> Setting:
    """The setting called `name` or one of its aliases."""
    key = name.strip().lower().lstrip("-").replace("-", "_")
    if key in _BY_ALIAS:
        return _BY_ALIAS[key]
    close = difflib.get_close_matches(key, list(_BY_ALIAS), n=1)
    hint = f"; did you mean {close[0]}?" if close else "; :help lists them"
    raise SettingError(f"unknown setting {name.strip()!r}{hint}")


class _SettingsMethods:
    """Behaviour of the generated `Settings` dataclass (its fields are the table's names)."""

    @classmethod
    def defaults(cls, model_name: str | None = None) -> "Settings":
        """The table's defaults with the model's `defaults:` from configs/models.yaml laid over them."""
        values = {s.name: s.default for s in TABLE}
        if model_name is not None:
            from turbo_repl.models.registry import get_model

            for name, value in get_model(model_name).defaults.items():
                setting = lookup(name)
                values[setting.name] = _checked(setting, value)
        return cls(**values)

    def with_value(self, name: str, text: Any) -> "Settings":
        """A copy with one setting changed; `name` may be an alias. Raises SettingError, changing nothing."""
        setting = lookup(name)
        return dataclasses.replace(self, **{setting.name: _checked(setting, text)})

    def with_values(self, pairs: dict[str, Any]) -> "Settings":
        result = self
        for name, value in pairs.items():
            result = result.with_value(name, value)
        return result

    def to_dict(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in TABLE}

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "Settings | None" = None) -> "Settings":
        """Settings from a record or session file; missing names keep `base` (the table defaults if None)."""
        if not isinstance(data, dict):
            raise SettingError(f"settings must be a mapping of name: value, not {type(data).__name__}")
        return (base or cls.defaults()).with_values(data)

    def changed(self, base: "Settings") -> list[str]:
        """Names whose value differs from `base`."""
        return [s.name for s in TABLE if getattr(self, s.name) != getattr(base, s.name)]

    @property
    def size(self) -> tuple[int, int]:
        return resolution_size(self.resolution, self.aspect)


def _checked(setting: Setting, value: Any) -> Any:
    try:
        return setting.coerce(value)
    except SettingError as e:
        raise SettingError(f"{setting.name}: {e}") from None


Settings = dataclasses.make_dataclass(
    "Settings",
    [(s.name, s.type) for s in TABLE],
    bases=(_SettingsMethods,),
    frozen=True,
)
Settings.__module__ = __name__
Settings.__doc__ = "One immutable value per setting of TABLE; make changed copies with `with_value`."


def markdown() -> str:
    """The settings as a Markdown table, for the README: `python -m turbo_repl.settings`."""
    rows = ["| setting | values | default | aliases | what it does |", "|---|---|---|---|---|"]
    for s in TABLE:
        aliases = ", ".join(f"`{a}`" for a in s.aliases)
        rows.append(f"| `{s.name}` | {s.values} | `{s.text(s.default)}` | {aliases} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
