"""The engine: loads a model once and turns requests into videos.

Contract used by the REPL, `turbo-repl run`, `replay` and `bench`:

    engine = Engine(model="tiny", checkpoint_dir=None, device="auto")
    video = engine.generate(Request(prompt, settings, seed), progress=callback, cancel=event)

`settings` is a `turbo_repl.settings.Settings`; the seed is always a concrete int (whoever resolves
`seed random` records the drawn value). `progress(stage, done, total)` is called between steps and chunks;
`cancel` is anything with `is_set()` (a threading.Event); when it is set, `generate` raises `Cancelled`
at the next step or VAE chunk, and the engine stays loaded and usable.
"""

from turbo_repl.engine.types import Cancelled, Progress, Request, Video

__all__ = ["Cancelled", "Progress", "Request", "Video", "Engine"]


def __getattr__(name):  # Engine pulls in torch and the models: import it only when asked for
    if name == "Engine":
        from turbo_repl.engine.engine import Engine

        return Engine
    raise AttributeError(name)
