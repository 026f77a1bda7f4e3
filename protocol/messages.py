"""Messages on the wire between gateways and workers.

All broker messages are frozen, kw-only msgspec Structs with an explicit string
tag (``"type"``), so renaming a class never changes the wire. Schemas evolve by
appending fields with defaults; decoders ignore unknown fields so an older peer
keeps working beside a newer one.
"""

from __future__ import annotations

import msgspec

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"
FINISH_TOOL_CALLS = "tool_calls"
"""The answer ended by calling tools (OpenAI's ``tool_calls``, Anthropic's ``tool_use``)."""


class ToolCall(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A call the model made (or made earlier in the conversation); `arguments` is JSON text."""

    id: str
    name: str
    arguments: str = "{}"


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One turn of a conversation, in canonical form (dialects convert to it)."""

    role: str
    """``system``, ``user``, ``assistant`` or ``tool`` (a tool's result, answering `tool_call_id`)."""
    content: str = ""
    name: str | None = None
    tool_calls: list[ToolCall] = []
    """On assistant turns: the tools it called."""
    tool_call_id: str | None = None
    is_error: bool = False
    """On tool turns: the tool failed, and `content` says how."""


class Sampling(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How to pick tokens. ``temperature == 0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = []
    seed: int | None = None
    ignore_eos: bool = False
    """Keep generating past the end token (benchmarks: fixed-length outputs)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 means no limit."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    """OpenAI's penalties: subtracted from a token's logit once if it was generated, and per time it was."""
    logprobs: bool = False
    """Report each generated token's log probability (and `top_logprobs` alternatives) in the chunks."""
    top_logprobs: int = 0
    logit_bias: dict[int, float] = {}
    """OpenAI's ``logit_bias``: added to these token ids' logits before each pick (-100 bans, +100 forces)."""


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Constrain the output: ``json_object`` (any object) or ``json_schema`` (`schema`, as JSON text)."""

    type: str
    schema: str = ""


class Tool(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A function the model may call; `parameters` is its arguments' JSON schema, as JSON text."""

    name: str
    description: str = ""
    parameters: str = ""


TOOL_CHOICE_AUTO = "auto"
TOOL_CHOICE_NONE = "none"
TOOL_CHOICE_REQUIRED = "required"
TOOL_CHOICE_FUNCTION = "function"


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``auto`` (the model decides), ``none``, ``required`` (at least one call), or ``function`` (`name`)."""

    mode: str = TOOL_CHOICE_AUTO
    name: str = ""


class Reasoning(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Thinking, for models that reason before answering."""

    enabled: bool | None = None
    """None: the model's own default; False asks its chat template to skip thinking, where it can."""
    budget_tokens: int = 0
    """Close the thinking after this many tokens (0: no limit)."""


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    """Where an interrupted answer stopped: a failover continues it on another worker.

    The gateway republishes a request whose worker died mid-answer with the
    tokens its client already has; the new worker takes them as generated
    (sending nothing for them) and carries on from there.
    """

    token_ids: list[int]
    """The answer's tokens delivered so far (every `Chunk.token_ids` received, in order)."""
    seq: int
    """The `Chunk.seq` the continuation starts at."""
    attempt: int
    """1 for the first failover, 2 for the next..."""


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="generate"):
    """A generation request, published to ``cortex.req.<model-token>``."""

    request_id: str
    model: str
    messages: list[Message]
    sampling: Sampling = Sampling()
    stream: bool = False
    deadline: float = 0.0
    """Unix time (seconds) after which nobody waits for the answer; 0 means none."""
    reply_subject: str = ""
    created: float = 0.0
    prompt: str | None = None
    """Raw text to continue, without the chat template (legacy completions); `messages` is then empty."""
    count_only: bool = False
    """Only count the prompt's tokens: the one final chunk carries them in `usage`."""
    response_format: ResponseFormat | None = None
    tools: list[Tool] = []
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    """False: at most one call per answer."""
    reasoning: Reasoning = Reasoning()
    clamp_max_tokens: bool = False
    """A `sampling.max_tokens` over what the context leaves after the prompt is lowered to fit, not refused."""
    resume: Resume | None = None
    """Set on a failover: continue the answer after these tokens (`request_id` is then the attempt's own id)."""
    prefix_keys: list[str] = []
    """Conversation affinity: keys of the prompt's prefixes worth finding in a worker's cache (the system part, the
    whole conversation so far; `cortex.gateway.affinity`). A worker that answers it advertises them
    (`ModelState.prefix_keys`)."""


class Usage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV the worker reused from an earlier request."""
    reasoning_tokens: int = 0
    """Completion tokens spent thinking."""
    slot_seconds: float = 0.0
    """Seconds the request held a place in its worker's batch (from its admission to its end), for usage
    accounting; after a failover, the last worker's share."""


class ChunkError(msgspec.Struct, frozen=True, kw_only=True):
    """Why a request failed on the worker. ``code`` is one of `ERROR_CODES`."""

    code: str
    message: str
    param: str = ""
    """The request field at fault (``logit_bias``); empty: the prompt, as the gateway's dialect names it."""


ERROR_INVALID_REQUEST = "invalid_request"
ERROR_CONTEXT_LENGTH = "context_length_exceeded"
ERROR_DEADLINE = "deadline_exceeded"
ERROR_MODEL_NOT_LOADED = "model_not_loaded"
ERROR_INTERNAL = "internal"
ERROR_CODES = frozenset(
    {ERROR_INVALID_REQUEST, ERROR_CONTEXT_LENGTH, ERROR_DEADLINE, ERROR_MODEL_NOT_LOADED, ERROR_INTERNAL}
)


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A generated token, its log probability, and the most likely alternatives at that step.

    The probabilities are the model's after constraints (a grammar's masks,
    penalties) and before temperature, top-p and top-k.
    """

    token: str
    logprob: float
    top: list[TopLogprob] = []


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A piece of the `index`-th tool call of an answer.

    The first piece of a call carries its `id` and `name`; `arguments` pieces
    concatenate to the call's JSON arguments.
    """

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


class Chunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="chunk"):
    """A slice of one request's output, sent on the request's reply subject.

    ``seq`` starts at 0 and increases by one per chunk, so the gateway can tell a
    lost chunk from the end of a stream. The first chunk names the worker and the
    prompt's token count; the last one carries ``finish_reason`` and ``usage``
    (or ``error``).
    """

    request_id: str
    seq: int
    text: str = ""
    tokens: int = 0
    """Generated tokens covered by this chunk (0 for a pure status chunk)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Generated tokens so far, this chunk included."""
    finish_reason: str | None = None
    usage: Usage | None = None
    worker_id: str = ""
    error: ChunkError | None = None
    stop_sequence: str | None = None
    """On the last chunk: the stop string that ended the answer, if one did."""
    tool_calls: list[ToolCallDelta] = []
    """Tool-call pieces, after this chunk's `text`."""
    logprobs: list[TokenLogprob] = []
    """One entry per token covered by this chunk, when the request asked for them."""
    reasoning: str = ""
    """Thinking text, which comes before this chunk's `text`."""
    max_tokens: int = 0
    """On the first chunk: the completion's token limit when the worker lowered the one asked for to fit the
    context (`GenerateRequest.clamp_max_tokens`); 0 when it runs as asked."""
    token_ids: list[int] = []
    """The generated token ids this chunk covers (`tokens` of them), so the gateway holds exactly what was sent
    and can resume the answer elsewhere (`GenerateRequest.resume`)."""
    instance: str = ""
    """With `worker_id`: which start of that worker process sent the chunk (`Heartbeat.instance`)."""
    stream_seq: int = 0
    """With `worker_id`: the sequence in the request stream of the message the worker serves (a request moved from a
    worker's affine subject to the shared one has a new one); 0 from a worker that does not say."""

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


KEEP_FOREVER = -1.0
"""`keep_alive` of a model that never unloads for being idle."""


class ModelCard(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """What a catalogue says about a model a worker can serve."""

    id: str
    aliases: list[str] = []
    context_length: int = 0
    source: str = ""
    created: int = 0
    memory: int = 0
    """Bytes the model needs on this worker's device: weights plus the KV-cache reserve (estimated)."""
    priority: int = 0
    """Under the ``priority`` eviction strategy, lower priorities go first."""
    keep_alive: float = 300.0
    """Seconds idle before the model unloads; 0: at once, `KEEP_FOREVER`: never."""
    min_replicas: int = 0
    max_replicas: int = 1
    gpus: int = 1
    scale_evicts: bool = False
    """A replica added for a deep queue may evict idle models of lower `priority` when no worker has room."""


MODEL_LOADING = "loading"
MODEL_READY = "ready"
MODEL_UNLOADING = "unloading"
MODEL_FAILED = "failed"


class ModelState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """A model on a worker: loading, ready, or failed (with the reason)."""

    id: str
    state: str
    in_flight: int = 0
    context_length: int = 0
    error: str = ""
    reasoning: bool = False
    """The model thinks before answering (learned when it loaded)."""
    memory: int = 0
    """Bytes it takes here, as planned: the catalogue's ``memory`` or the estimate (unloading logs what it freed)."""
    last_used: float = 0.0
    """Unix time its last request finished (or it became ready)."""
    progress: float = 0.0
    """0 to 1 while loading."""
    queue_depth: int = 0
    """Requests waiting in the model's queue (measured by workers that serve it)."""
    prefix_keys: list[str] = []
    """The `GenerateRequest.prefix_keys` of the requests this worker answered last for the model, newest first (at
    most `cortex.worker.conversations.ADVERTISED`): prompts it likely holds in its prefix cache."""
    affine: bool = False
    """The worker takes requests for the model on its affine subject (it has its consumer of it): gateways send it
    affine requests only while this says so (conversation affinity)."""


LOAD_SECONDS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Lifecycle(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """A worker's model loads and unloads since it started (cumulative, as Prometheus counters are)."""

    cold_starts: dict[str, int] = {}
    """Loads completed, per model."""
    load_failures: dict[str, int] = {}
    evictions: dict[str, int] = {}
    """Unloads per reason: ``lru``/``priority`` (room for another model), ``keep_alive``, ``unplaced``, ``drain``."""
    load_seconds_buckets: list[int] = []
    """Loads that took at most each of `LOAD_SECONDS_BUCKETS` seconds (cumulative counts)."""
    load_seconds_sum: float = 0.0
    loads: int = 0
    host_tier_loads: dict[str, int] = {}
    """Of `cold_starts`, the loads that were a copy back from the host tier, per model."""
    loads_called_off: dict[str, int] = {}
    """Cold loads called off because every request waiting for them was cancelled or timed out, per model."""


class WorkerAdvert(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="advert", gc=False
):
    """A worker's capacity, kept fresh in the fleet bucket under `worker_key`.

    ``gc=False`` here and on the Structs it holds (`ModelCard`, `ModelState`, `Lifecycle`): none of them can
    reference itself or an advert, so the garbage collector need not track them (readers hold hundreds of adverts,
    rewritten every 2 s: tracking them was most of a reader's cost, docs/scale.md).
    """

    worker_id: str
    host: str
    device: str
    device_name: str = ""
    memory_total: int = 0
    memory_free: int = 0
    models: list[ModelState] = []
    catalogue: list[ModelCard] = []
    slots_total: int = 0
    slots_free: int = 0
    memory_budget: int = 0
    """Bytes models may take on this worker (``--memory-budget``, else the device's memory)."""
    memory_used: int = 0
    """Bytes taken by models that are ready or unloading (their planned `ModelState.memory`)."""
    memory_reserved: int = 0
    """Bytes set aside for models that are loading (estimated)."""
    draining: bool = False
    devices: int = 1
    """Devices the worker owns (a model needs `ModelCard.gpus` of them)."""
    eviction: str = "lru"
    """How this worker picks models to unload when it needs room: ``lru`` or ``priority``."""
    lifecycle: Lifecycle | None = None
    version: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    pid: int = 0
    host_cached: list[str] = []
    """Models parked in the worker's host tier (``--host-cache``), most recently parked first: loading one is a
    copy back to the device. They take none of `memory_budget`."""
    host_cache_bytes: int = 0
    """The host tier's size (0: none)."""
    host_cache_used: int = 0
    """Bytes the models in `host_cached` take in host memory."""
    catalogue_digest: str = ""
    """The worker's catalogue by digest (`cortex.protocol.catalogues`), stored once under `names.catalogue_key` in
    ``cortex-catalogues``; `catalogue` is then empty on the wire and readers fill it in from there. "": the
    catalogue is inline (an older worker, or ``--advert-catalogue inline``)."""
    advert_format: int = 0
    """What the writer's adverts are and what it reads in others' (`cortex.protocol.catalogues.ADVERT_FORMAT`):
    0, a worker from before catalogues by digest, which takes an advert without an inline catalogue for a worker
    with no models; 1, one that reads catalogues by digest."""
    keeper: bool = False
    """Whether this worker keeps watch over the fleet for the others (`cortex.worker.keeper`; shown by cortexctl)."""

    def ready_models(self) -> list[str]:
        return [m.id for m in self.models if m.state == MODEL_READY]

    def state_of(self, model: str) -> ModelState | None:
        return next((m for m in self.models if m.id == model), None)

    def card(self, model: str) -> ModelCard | None:
        return next((c for c in self.catalogue if c.id == model), None)


class Placement(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="placement"):
    """Where a model should be loaded: the workers named here load it, the others unload it.

    Kept in the placement bucket under `placement_key`; every change is a
    compare-and-set on the key's revision, so concurrent deciders (gateways,
    workers, cortexctl) never both win.
    """

    model: str
    workers: list[str] = []
    reason: str = ""
    """Why the last worker was chosen (or why there is none)."""
    failed: dict[str, str] = {}
    """Workers that could not load the model, and why."""
    error: str = ""
    """Set when no worker can load the model; requests for it fail with this."""
    updated_at: float = 0.0
    by: str = ""
    """Who wrote this revision: a gateway, a worker or cortexctl."""
    attempts: int = 0
    """Rounds in a row in which every worker failed to load the model (see `retry_at`)."""
    retry_at: float = 0.0
    """Unix time at which the model is tried again by itself, after every worker failed to load it (0: no retry
    due: none failed, or the retries stopped after `cortex.protocol.retries.RETRY_LIMIT` rounds)."""


class Pin(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="pin"):
    """A model kept loaded: at least `replicas` copies of it (or the one on `worker`) never evicted or unloaded for
    idleness; copies beyond `replicas` are ordinary replicas."""

    model: str
    replicas: int = 1
    worker: str = ""
    pinned_at: float = 0.0


class Keeper(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="keeper"):
    """The worker that keeps watch over the whole fleet for the others (`names.KEEPER_KEY`; `cortex.worker.keeper`).

    It alone watches every advert and heartbeat, keeps pins and ``min_replicas`` placed and retries failed loads;
    the other workers read the fleet only for their own rare decisions. It rewrites this record every
    `names.KEEPER_RENEW_S`; one not rewritten for `names.KEEPER_LEASE_S` (by the reader's clock) may be taken over.
    """

    worker_id: str
    instance: str = ""
    """The keeper's process (`Heartbeat.instance`): a restart under the same id holds the lease afresh."""
    since: float = 0.0
    renewed: float = 0.0
    inline_catalogues: bool = False
    """Whether some live worker reads only catalogues inline (a release before catalogues by digest): every worker
    then writes its catalogue inline in its advert (`cortex.protocol.catalogues`)."""


class Drain(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="drain"):
    """A worker told to drain (`cortexctl drain`), kept under `drain_key` until `cortexctl undrain` deletes it.

    Its presence is the flag; the value says since when. Flags written before
    this Struct existed are ``{"since": ...}`` with no tag, which it decodes too.
    """

    since: float = 0.0


class Taken(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="taken"):
    """A worker's word to a request's gateway, before any chunk: it took the request, or handed it on.

    Sent on `names.taken_subject` of the request's reply subject, as a core message,
    the moment the worker starts the request (`moved` False) or moves it from its
    affine subject to the model's shared one (`moved` True). The gateway then knows
    where the request is while a long prefill sends nothing: it watches that worker's
    liveness instead of whether the worker still serves the model, and never sends
    on a request that is already running. A lost notice costs only that knowledge.
    """

    request_id: str
    """The attempt's id (`GenerateRequest.request_id`)."""
    worker_id: str = ""
    """The worker that took it, or moved it."""
    instance: str = ""
    """Which start of that worker's process (`Heartbeat.instance`)."""
    stream_seq: int = 0
    """The sequence in the request stream of the message it serves (0: none any more: the worker holds the only copy,
    a move the broker refused having acked it), or of the copy it moved."""
    moved: bool = False
    """Not taken: handed on to the model's shared subject (its window passed, or the model left the worker)."""
