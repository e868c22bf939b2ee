"""Property tests: decode() returns a ToDeviceEvent or raises DecodeError, whatever it is given."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import msgspec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bot_toolkit import DecodeError, ToDeviceEvent, UnknownToDeviceEvent, decode, encode_content
from tests.test_events import EXAMPLES

# Sized so the whole file runs in well under 30 s; each example below checks several events.
MANY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KNOWN_TYPES = sorted({raw["type"] for raw, *_ in EXAMPLES.values()})
EXAMPLE_NAMES = sorted(EXAMPLES)

# Integers around the edges msgspec and JSON care about, and far beyond them.
INTS = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400]),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from([*KNOWN_TYPES, "m.sas.v1", "m.reciprocate.v1", "request", "m.no_olm"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
# Not JSON at all: what a careless caller might put into a mapping.
GARBAGE_SCALARS = st.one_of(
    JSON_SCALARS,
    st.floats(),  # NaN and infinities
    st.binary(max_size=8),
    st.just(object()),
    st.frozensets(st.integers(), max_size=3),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.complex_numbers(allow_nan=True),
)
GARBAGE_KEYS = st.one_of(
    st.text(max_size=12), st.integers(), st.none(), st.tuples(st.integers()), st.booleans()
)
GARBAGE_VALUES = st.recursive(
    GARBAGE_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(GARBAGE_KEYS, inner, max_size=4),
    ),
    max_leaves=12,
)


def check(raw: object, *, decrypted_from: Any = None) -> ToDeviceEvent | None:
    """decode(raw) gives a ToDeviceEvent or a well-formed DecodeError; nothing else."""
    try:
        event = decode(raw, decrypted_from=decrypted_from)  # type: ignore[arg-type]
    except DecodeError as error:
        assert error.event_type is None or isinstance(error.event_type, str)
        assert isinstance(error.path, str)
        assert isinstance(error.reason, str)
        assert error.reason
        assert str(error)
        return None
    assert isinstance(event, ToDeviceEvent)
    assert isinstance(event.sender, str)
    repr(event)  # must not fail either
    return event


def _containers(value: Any) -> list[Any]:
    """Every dict and list inside ``value`` (``value`` included)."""
    found: list[Any] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            found.append(item)
            stack.extend(item)
    return found


@st.composite
def mutated_examples(draw: st.DrawFn, values: st.SearchStrategy[Any] = JSON_VALUES) -> Any:
    """A valid example with a few random edits: keys dropped, values replaced, keys added."""
    raw = copy.deepcopy(EXAMPLES[draw(st.sampled_from(EXAMPLE_NAMES))][0])
    if draw(st.integers(0, 3)) == 0:  # another type's content under this type
        raw["type"] = draw(st.sampled_from([*KNOWN_TYPES, "org.example.unknown"]))
    for _ in range(draw(st.integers(1, 4))):
        # Mostly inside the content; now and then the envelope itself.
        envelope = draw(st.integers(0, 15)) == 0 or not isinstance(raw.get("content"), dict)
        containers = _containers(raw if envelope else raw["content"])
        target = containers[draw(st.integers(0, len(containers) - 1))]
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        if isinstance(target, dict):
            keys = list(target)
            if action == "add" or not keys:
                target[draw(st.text(max_size=12))] = draw(values)
            elif action == "drop":
                del target[draw(st.sampled_from(keys))]
            else:
                target[draw(st.sampled_from(keys))] = draw(values)
        elif target:
            index = draw(st.integers(0, len(target) - 1))
            if action == "drop":
                del target[index]
            else:
                target[index] = draw(values)
        else:
            target.append(draw(values))
    return raw


@SOME
@given(mutated_examples())
def test_mutated_examples(raw: Any) -> None:
    check(raw)
    check(json.dumps(raw))
    content = raw.get("content")
    if isinstance(content, dict):  # and every variant with one more content key missing
        for key in list(content):
            check({**raw, "content": {k: v for k, v in content.items() if k != key}})


@FEW
@given(mutated_examples(GARBAGE_VALUES), st.one_of(st.none(), st.text(max_size=5), INTS))
def test_mutated_examples_with_non_json_values(raw: Any, decrypted_from: Any) -> None:
    check(raw, decrypted_from=decrypted_from)


@FEW
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.one_of(st.sampled_from(KNOWN_TYPES), JSON_VALUES),
            "sender": st.one_of(st.just("@bob:example.org"), JSON_VALUES),
            "content": st.one_of(st.dictionaries(st.text(max_size=30), JSON_VALUES), JSON_VALUES),
        },
    )
)
def test_random_envelopes(raw: dict[str, Any]) -> None:
    check(raw)


@FEW
@given(st.dictionaries(GARBAGE_KEYS, GARBAGE_VALUES, max_size=4))
def test_known_types_with_garbage_content(content: dict[Any, Any]) -> None:
    for event_type in KNOWN_TYPES:
        check({"type": event_type, "sender": "@bob:example.org", "content": content})


@FEW
@given(GARBAGE_VALUES)
def test_any_python_value(raw: Any) -> None:
    check(raw)


@MANY
@given(st.binary(max_size=200))
def test_random_bytes(raw: bytes) -> None:
    check(raw)
    check(raw.decode("latin-1"))


@FEW
@given(mutated_examples(), st.data())
def test_mutated_json_text(raw: Any, data: st.DataObject) -> None:
    text = bytearray(json.dumps(raw).encode())
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, max(0, len(text) - 1)))
        edit = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if edit == "flip" and text:
            text[position] = data.draw(st.integers(0, 255))
        elif edit == "cut":
            del text[position:]
        else:
            text[position:position] = data.draw(
                st.sampled_from([b"NaN", b"1e999", b"[", b"{", b"\\ud800", b"-", b"99999" * 30])
            )
    check(bytes(text))


def _json_clean(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_clean(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_clean(v) for v in value)
    return value is None or isinstance(value, (str, int, bool))


@SOME
@given(mutated_examples())
def test_decoded_events_round_trip(raw: Any) -> None:
    """Whatever decodes also encodes, and decodes again to an equal event."""
    assume(_json_clean(raw))
    event = check(raw)
    if event is None or isinstance(event, UnknownToDeviceEvent):
        return
    content = encode_content(event)
    msgspec.json.encode(content)
    again = decode({"type": event.event_type, "sender": event.sender, "content": content})
    assert again == event
