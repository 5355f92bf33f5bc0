"""turbo-repl: few-step Wan video generation in an interactive terminal."""

__version__ = "0.1.0"
