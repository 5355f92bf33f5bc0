import os
from pathlib import Path

import pytest

# Triton kernels run through Triton's interpreter on machines without a GPU. It must be chosen before
# triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(os.environ.get("TURBO_REPL_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "index.json").exists():
        pytest.skip(f"golden fixtures not found at {FIXTURES} (set TURBO_REPL_FIXTURES)")
    return FIXTURES
