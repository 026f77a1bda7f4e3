"""The wire protocol: name escaping, subject/key shapes and the JSON codec round trips."""

from __future__ import annotations

import json
import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cortex.protocol import (
    Chunk,
    ChunkError,
    GenerateRequest,
    Message,
    ModelCard,
    ModelState,
    Sampling,
    Usage,
    WorkerAdvert,
    codec,
    consumer_name,
    decode_model_token,
    encode_model_token,
    reply_subject,
    reply_wildcard,
    request_subject,
    request_subject_wildcard,
    worker_key,
)
from cortex.protocol.names import affine_consumer_name, affine_subject, affine_wildcard, request_id_from_reply

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# NATS KV keys: https://docs.nats.io/nats-concepts/jetstream/key-value-store
KV_KEY_RE = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
# A subject token must not contain separators, wildcards or whitespace.
BAD_SUBJECT_CHARS = re.compile(r"[.*>\s]")

# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------


@given(st.text(min_size=1))
def test_model_token_round_trip(name: str) -> None:
    token = encode_model_token(name)
    assert TOKEN_RE.fullmatch(token), token
    assert decode_model_token(token) == name


@given(st.text(min_size=1), st.text(min_size=1))
def test_model_token_is_injective(a: str, b: str) -> None:
    if a != b:
        assert encode_model_token(a) != encode_model_token(b)
    else:
        assert encode_model_token(a) == encode_model_token(b)


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("org/Model-1.5B.Q4", "org_2FModel-1_2E5B_2EQ4"),
        ("a_b", "a_5Fb"),
        ("plain-Name-123", "plain-Name-123"),
        ("é", "_C3_A9"),
        ("a b*>", "a_20b_2A_3E"),
    ],
)
def test_model_token_known_values(name: str, token: str) -> None:
    assert encode_model_token(name) == token
    assert decode_model_token(token) == name


def test_underscore_in_name_cannot_collide_with_an_escape() -> None:
    # "_2E" literally must not encode like ".".
    assert encode_model_token("_2E") != encode_model_token(".")
    assert decode_model_token(encode_model_token("_2E")) == "_2E"


def test_encode_empty_model_raises() -> None:
    with pytest.raises(ValueError):
        encode_model_token("")


@pytest.mark.parametrize("token", ["a_G1", "a.b", "_4", "", "_", "a_2", "a_2e", "a b", "a*", "caf\u00e9", "_C3"])
def test_decode_malformed_token_raises(token: str) -> None:
    # "_C3" is well-formed but not valid UTF-8: UnicodeDecodeError is a ValueError.
    with pytest.raises(ValueError):
        decode_model_token(token)


def test_request_subject_has_three_tokens() -> None:
    subject = request_subject("org/Model-1.5B.Q4")
    tokens = subject.split(".")
    assert len(tokens) == 3
    assert tokens[:2] == ["cortex", "req"]
    assert all(tokens) and not any(BAD_SUBJECT_CHARS.search(t) for t in tokens)
    assert decode_model_token(tokens[2]) == "org/Model-1.5B.Q4"


def test_request_subject_matches_wildcard() -> None:
    wildcard = request_subject_wildcard().split(".")
    subject = request_subject("some.model > x *").split(".")
    assert wildcard[:-1] == subject[:2] and wildcard[-1] == ">"  # the affine subjects, one token deeper, too
    affine = affine_subject("some.model > x *", "host.a/gpu 0").split(".")
    assert affine[:3] == subject and len(affine) == 4 and not BAD_SUBJECT_CHARS.search(affine[3])
    assert affine_wildcard("some.model > x *").split(".") == [*subject, ">"]


@given(st.text(min_size=1), st.text(min_size=1))
def test_affine_consumer_names_are_valid_and_distinct(model: str, worker: str) -> None:
    consumer = affine_consumer_name(model, worker)
    assert not BAD_SUBJECT_CHARS.search(consumer) and consumer != consumer_name(model)
    # "__" never occurs inside a token, so the name splits back into its model and worker.
    head, tail = consumer.removeprefix("cortex-").split("__")
    assert (decode_model_token(head), decode_model_token(tail)) == (model, worker)


@given(st.text(min_size=1))
def test_request_subject_always_three_tokens(name: str) -> None:
    tokens = request_subject(name).split(".")
    assert len(tokens) == 3
    assert not BAD_SUBJECT_CHARS.search(tokens[2])


@given(st.text(min_size=1))
def test_consumer_name_and_worker_key_are_valid(name: str) -> None:
    consumer = consumer_name(name)
    # Consumer names may not contain '.', '*', '>' or whitespace.
    assert consumer and not BAD_SUBJECT_CHARS.search(consumer)
    key = worker_key(name)
    assert KV_KEY_RE.fullmatch(key), key
    assert not key.startswith(".") and not key.endswith(".")


def test_consumer_name_and_worker_key_examples() -> None:
    assert consumer_name("org/Model-1.5B.Q4") == "cortex-org_2FModel-1_2E5B_2EQ4"
    assert worker_key("host.example/gpu 0") == "workers.host_2Eexample_2Fgpu_200"
    assert consumer_name("a") != consumer_name("b")
    assert worker_key("a.b") != worker_key("a_b")


def test_reply_subject_and_request_id() -> None:
    subject = reply_subject("gw-1", "req_abc-123")
    assert subject == "cortex.reply.gw-1.req_abc-123"
    assert request_id_from_reply(subject) == "req_abc-123"
    assert reply_wildcard("gw-1") == "cortex.reply.gw-1.*"


@pytest.mark.parametrize(
    ("gateway_id", "request_id"),
    [("gw", "a.b"), ("g.w", "abc"), ("gw", ""), ("", "abc"), ("gw", "a*"), ("gw", ">"), ("gw", "a b")],
)
def test_reply_subject_rejects_bad_ids(gateway_id: str, request_id: str) -> None:
    with pytest.raises(ValueError):
        reply_subject(gateway_id, request_id)


def test_reply_wildcard_rejects_dots() -> None:
    with pytest.raises(ValueError):
        reply_wildcard("gw.1")


# ---------------------------------------------------------------------------
# codec
# ---------------------------------------------------------------------------

short_text = st.text(max_size=20)
ident = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=16)
finite = st.floats(allow_nan=False, allow_infinity=False)
small_int = st.integers(min_value=0, max_value=2**53)

messages = st.builds(Message, role=st.sampled_from(["system", "user", "assistant"]), content=short_text,
                     name=st.none() | short_text)  # fmt: skip
samplings = st.builds(
    Sampling,
    temperature=finite,
    top_p=finite,
    max_tokens=st.none() | small_int,
    stop=st.lists(short_text, max_size=4),
    seed=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
requests = st.builds(
    GenerateRequest,
    request_id=ident,
    model=st.text(min_size=1, max_size=30),
    messages=st.lists(messages, max_size=4),
    sampling=samplings,
    stream=st.booleans(),
    deadline=finite,
    reply_subject=short_text,
    created=finite,
)
usages = st.builds(Usage, prompt_tokens=small_int, completion_tokens=small_int, total_tokens=small_int)
chunk_errors = st.builds(ChunkError, code=short_text, message=short_text)
chunks = st.builds(
    Chunk,
    request_id=ident,
    seq=small_int,
    text=short_text,
    tokens=small_int,
    prompt_tokens=small_int,
    completion_tokens=small_int,
    finish_reason=st.none() | st.sampled_from(["stop", "length", "error"]),
    usage=st.none() | usages,
    worker_id=short_text,
    error=st.none() | chunk_errors,
)
model_states = st.builds(ModelState, id=short_text, state=st.sampled_from(["loading", "ready", "failed"]),
                         in_flight=small_int, context_length=small_int, error=short_text)  # fmt: skip
model_cards = st.builds(ModelCard, id=short_text, aliases=st.lists(short_text, max_size=3), context_length=small_int,
                        source=short_text, created=small_int)  # fmt: skip
adverts = st.builds(
    WorkerAdvert,
    worker_id=ident,
    host=short_text,
    device=short_text,
    device_name=short_text,
    memory_total=small_int,
    memory_free=small_int,
    models=st.lists(model_states, max_size=3),
    catalogue=st.lists(model_cards, max_size=3),
    slots_total=small_int,
    slots_free=small_int,
    version=short_text,
    started_at=finite,
    updated_at=finite,
    pid=small_int,
)


@given(requests)
def test_request_round_trip(request: GenerateRequest) -> None:
    data = codec.encode(request)
    assert json.loads(data)["type"] == "generate"
    assert codec.decode_request(data) == request


@given(chunks)
def test_chunk_round_trip(chunk: Chunk) -> None:
    data = codec.encode(chunk)
    assert json.loads(data)["type"] == "chunk"
    decoded = codec.decode_chunk(data)
    assert decoded == chunk
    assert decoded.final == (chunk.finish_reason is not None or chunk.error is not None)


@given(adverts)
def test_advert_round_trip(advert: WorkerAdvert) -> None:
    data = codec.encode(advert)
    assert json.loads(data)["type"] == "advert"
    assert codec.decode_advert(data) == advert


def test_request_example_round_trip() -> None:
    request = GenerateRequest(
        request_id="r1",
        model="org/Model-1.5B.Q4",
        messages=[Message(role="system", content="Be brief."), Message(role="user", content="hi 🙂", name="bob")],
        sampling=Sampling(temperature=0.0, max_tokens=16, stop=["\n\n", "END"], seed=7),
        stream=True,
        deadline=1234.5,
        reply_subject=reply_subject("gw", "r1"),
    )
    decoded = codec.decode_request(codec.encode(request))
    assert decoded == request
    assert decoded.sampling.stop == ["\n\n", "END"]
    assert decoded.messages[1].name == "bob"


def test_request_defaults_are_omitted_and_restored() -> None:
    request = GenerateRequest(request_id="r", model="m", messages=[Message(role="user")])
    raw = json.loads(codec.encode(request))
    assert raw == {"type": "generate", "request_id": "r", "model": "m", "messages": [{"role": "user"}]}
    decoded = codec.decode_request(codec.encode(request))
    assert decoded == request
    assert decoded.sampling == Sampling()
    assert decoded.sampling.stop == []


def test_chunk_without_error_or_usage_round_trip() -> None:
    chunk = Chunk(request_id="r", seq=3, text="héllo", tokens=2, completion_tokens=5)
    decoded = codec.decode_chunk(codec.encode(chunk))
    assert decoded == chunk
    assert decoded.usage is None and decoded.error is None
    assert not decoded.final


def test_chunk_with_usage_round_trip() -> None:
    chunk = Chunk(
        request_id="r", seq=9, finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    )
    decoded = codec.decode_chunk(codec.encode(chunk))
    assert decoded == chunk
    assert decoded.usage == Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    assert decoded.final


def test_chunk_with_error_round_trip() -> None:
    chunk = Chunk(request_id="r", seq=0, error=ChunkError(code="internal", message="boom"), worker_id="w")
    decoded = codec.decode_chunk(codec.encode(chunk))
    assert decoded == chunk
    assert decoded.error == ChunkError(code="internal", message="boom")
    assert decoded.final


def test_advert_example_round_trip() -> None:
    advert = WorkerAdvert(
        worker_id="w1",
        host="gpu-host",
        device="cuda:0",
        models=[ModelState(id="a", state="ready", in_flight=2), ModelState(id="b", state="loading")],
        catalogue=[ModelCard(id="a", aliases=["alpha"], context_length=8192, source="package:x")],
        slots_total=8,
        slots_free=6,
    )
    decoded = codec.decode_advert(codec.encode(advert))
    assert decoded == advert
    assert decoded.ready_models() == ["a"]
    assert decoded.catalogue[0].aliases == ["alpha"]


# ---------------------------------------------------------------------------
# schema evolution
# ---------------------------------------------------------------------------


def _with_extra_fields(data: bytes) -> bytes:
    raw = json.loads(data)
    raw["field_from_the_future"] = {"nested": [1, 2, 3]}
    raw["another_new_field"] = "x"
    return json.dumps(raw).encode()


def test_chunk_decoder_ignores_unknown_fields() -> None:
    chunk = Chunk(request_id="r", seq=1, text="hi", usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))
    raw = json.loads(codec.encode(chunk))
    raw["usage"]["future_tokens"] = 5
    raw["brand_new"] = True
    assert codec.decode_chunk(json.dumps(raw).encode()) == chunk


def test_request_and_advert_decoders_ignore_unknown_fields() -> None:
    request = GenerateRequest(request_id="r", model="m", messages=[Message(role="user", content="x")])
    assert codec.decode_request(_with_extra_fields(codec.encode(request))) == request
    advert = WorkerAdvert(worker_id="w", host="h", device="cpu", models=[ModelState(id="m", state="ready")])
    assert codec.decode_advert(_with_extra_fields(codec.encode(advert))) == advert


@pytest.mark.parametrize("tag", ["advert", "generate", "Chunk", "", 1])
def test_chunk_decoder_rejects_wrong_type_tag(tag: object) -> None:
    raw = json.loads(codec.encode(Chunk(request_id="r", seq=0)))
    raw["type"] = tag
    with pytest.raises(codec.DecodeError):
        codec.decode_chunk(json.dumps(raw).encode())


def test_decoders_reject_other_message_kinds() -> None:
    chunk = codec.encode(Chunk(request_id="r", seq=0))
    advert = codec.encode(WorkerAdvert(worker_id="w", host="h", device="cpu"))
    request = codec.encode(GenerateRequest(request_id="r", model="m", messages=[]))
    with pytest.raises(codec.DecodeError):
        codec.decode_request(chunk)
    with pytest.raises(codec.DecodeError):
        codec.decode_advert(request)
    with pytest.raises(codec.DecodeError):
        codec.decode_chunk(advert)


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b'{"type": "chunk"}', b'{"type": "chunk", "request_id": "r", "seq": "1"}'],
)
def test_chunk_decoder_rejects_malformed(data: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode_chunk(data)


def test_decode_error_is_msgspec_decode_error() -> None:
    assert codec.DecodeError is msgspec.DecodeError
    assert issubclass(msgspec.ValidationError, codec.DecodeError)
