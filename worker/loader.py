"""Loading a catalogue entry with transformers, and rendering prompts with its chat template."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cortex.protocol import Message, Tool
from cortex.worker.catalogue import ModelSpec
from cortex.worker.reasoning import ReasoningSyntax, detect_reasoning
from cortex.worker.tool_prompt import HERMES, ToolSyntax, chat_turns, detect_syntax
from cortex.worker.weights_cache import CacheError, entry_for

log = logging.getLogger("cortex.worker")

# Nothing is ever fetched from a model hub at run time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# For tokenizers that ship no chat template: ChatML, which most instruct models use.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DEFAULT_CONTEXT = 2048


_BUILDING = threading.Lock()
"""Held while transformers builds a model: it sets torch's process-wide default dtype (and patches ``torch.nn.init``)
for the while, and two loads on the loader threads doing so at once could leave either set wrong for good."""


class PromptError(ValueError):
    """The conversation cannot be rendered by this model's chat template."""


class LoadAborted(Exception):
    """The load was called off (its ``abort`` event set): raised between its phases, nothing of it kept."""


def check_abort(abort: threading.Event | None, spec: ModelSpec, phase: str) -> None:
    """Raise `LoadAborted` if `abort` is set: called between the phases of a load."""
    if abort is not None and abort.is_set():
        raise LoadAborted(f"the load of {spec.id} was called off before {phase}")


@contextlib.contextmanager
def _building(abort: threading.Event | None, spec: ModelSpec) -> Iterator[None]:
    """Hold `_BUILDING`; a load called off while it waits for another to build raises `LoadAborted`."""
    while not _BUILDING.acquire(timeout=0.1):
        check_abort(abort, spec, "building its model")
    try:
        yield
    finally:
        _BUILDING.release()


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: torch.device
    context_length: int
    eos_ids: frozenset[int]
    load_seconds: float = 0.0
    cache_arg: str = "past_key_values"
    """Name of forward()'s KV-cache argument (transformers renamed it to ``cache``)."""
    tool_syntax: ToolSyntax = HERMES
    reasoning: ReasoningSyntax | None = None
    """Set for models that think in tags before answering."""
    extra: dict[str, Any] = field(default_factory=dict)
    max_token_chars: int = 0
    """The longest token of the vocabulary, in characters (0: unknown)."""
    from_cache: bool = False
    """Whether the weights came from the converted-weights cache (``worker/weights_cache.py``)."""
    from_host: bool = False
    """Whether the model came back from the host tier (``worker/host_tier.py``): a copy to the device, no load."""

    def surely_too_long(self, text: str) -> bool:
        """Whether `text` cannot fit the context whatever it says, known without tokenizing it.

        No token covers more than `max_token_chars` characters, so a longer text needs more
        tokens than the context holds; twice that leaves room for normalizers that drop
        characters. Tokenizing megabytes only to refuse them took seconds of the engine thread.
        """
        return self.max_token_chars > 0 and len(text) > 2 * self.context_length * self.max_token_chars

    def tokenize(self, text: str) -> list[int]:
        """Raw text (no chat template), with the special tokens the tokenizer adds by itself."""
        return list(self.tokenizer(text)["input_ids"])

    def render_prompt(
        self, messages: list[Message], tools: list[Tool] | None = None, thinking: bool | None = None
    ) -> list[int]:
        """Token ids of the conversation, and the tools offered, through the model's own chat template."""
        return self.tokenize_rendered(self.render_text(messages, tools, thinking))

    def tokenize_rendered(self, text: str) -> list[int]:
        """A prompt the chat template wrote: its special tokens are in the text already."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_text(
        self, messages: list[Message], tools: list[Tool] | None = None, thinking: bool | None = None
    ) -> str:
        """The prompt text; `thinking` is handed to templates that can switch reasoning on or off."""
        turns, template_tools = chat_turns(messages, tools or [], self.tokenizer.chat_template, self.tool_syntax)
        # A conversation ending with an assistant turn is a prefill: the answer continues it
        # (Anthropic's semantics) instead of closing it and starting a new turn.
        prefill = bool(messages) and messages[-1].role == "assistant" and not messages[-1].tool_calls
        switches = {} if thinking is None else {"enable_thinking": thinking}  # Qwen3's and SmolLM3's name
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    turns, tools=template_tools, add_generation_prompt=not prefill, continue_final_message=prefill,
                    tokenize=False, **switches,
                )
            )  # fmt: skip
        except Exception as exc:  # jinja raises TemplateError for conversations the template rejects
            raise PromptError(f"the chat template of {self.spec.id} rejected the messages: {exc}") from exc


def _dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def load_model(
    spec: ModelSpec,
    device: torch.device,
    spread_over: list[torch.device] | None = None,
    weights_cache: Path | None = None,
    abort: threading.Event | None = None,
) -> LoadedModel:
    """Load tokenizer and weights through transformers (the GGUF path for GGUF files).

    With several CUDA devices in `spread_over` the layers are spread over them
    by accelerate's ``device_map``; inputs go to `device`, the first. With a
    `weights_cache` folder, weights that need converting (GGUF, another dtype)
    are loaded from there when a previous load left them, else written there.
    Setting `abort` (from another thread) calls the load off: `LoadAborted` is
    raised before its next phase (the tokenizer, the weights, the move to the device).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    folder = spec.resolve_folder()
    dtype = _dtype(spec, device)
    kwargs: dict[str, Any] = {}
    gpus = [d for d in spread_over or [] if d.type == "cuda"]
    if len(gpus) > 1:
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {d.index: int(torch.cuda.mem_get_info(d)[0] * 0.9) for d in gpus}
    entry = entry_for(weights_cache, spec, folder, dtype)
    model: Any = None
    if entry is not None and entry.present():
        check_abort(abort, spec, "reading its weights cache entry")
        try:
            with _building(abort, spec):
                tokenizer, model = entry.load(**kwargs)
        except CacheError as exc:
            log.warning("weights cache entry %s for %s is damaged (%s): deleting it", entry.path, spec.id, exc)
            entry.discard()
    from_cache = model is not None
    if model is None:
        source: dict[str, Any] = {"local_files_only": True}
        if spec.gguf_file:
            source["gguf_file"] = spec.gguf_file
        check_abort(abort, spec, "its tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, **source)
        check_abort(abort, spec, "its weights")
        with _building(abort, spec):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **source, **kwargs)
        if entry is not None:  # even for a load called off meanwhile: the next load of it maps the entry
            entry.store(model, tokenizer)
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    check_abort(abort, spec, "moving it to the device")
    if len(gpus) <= 1:
        model.to(device)
    model.eval()
    configured = int(getattr(model.config, "max_position_embeddings", 0) or _DEFAULT_CONTEXT)
    context_length = min(spec.context_length, configured) if spec.context_length else configured
    loaded = LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        context_length=context_length,
        eos_ids=_eos_ids(model, tokenizer),
        load_seconds=time.monotonic() - started,
        tool_syntax=detect_syntax(tokenizer.chat_template, spec.tool_format),
        reasoning=detect_reasoning(tokenizer.chat_template, spec.reasoning),
        cache_arg="cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values",
        max_token_chars=max(map(len, tokenizer.get_vocab()), default=0),
        from_cache=from_cache,
    )
    log.info("loaded %s on %s in %.1fs%s (context %d)", spec.id, device, loaded.load_seconds,
             " from the weights cache" if from_cache else "", context_length)  # fmt: skip
    return loaded
