"""The bottom toolbar: the model and the settings that shape the next video, changed ones highlighted."""

from __future__ import annotations

from html import escape

from prompt_toolkit.formatted_text import HTML

from turbo_repl.session import Session

SHOWN = ("seed", "steps", "frames", "attention", "topk", "ode")


def toolbar(session: Session) -> HTML:
    s, changed = session.settings, set(session.settings.changed(session.defaults))
    w, h = s.size

    def item(label: str, value, names: tuple[str, ...]) -> str:
        text = escape(f"{label} {value}".strip())
        return f"<b>{text}</b>" if changed & set(names) else text

    parts = [f"<b>{escape(session.model)}</b>", item("", f"{w}×{h} {s.aspect}", ("resolution", "aspect"))]
    for name in SHOWN:
        value = getattr(s, name)
        parts.append(item(name, "on" if value is True else "off" if value is False else value, (name,)))
    if s.image:
        parts.append(item("image", s.image, ("image",)))
    return HTML(" " + "  │  ".join(parts) + "   <i>:help</i>")
