"""Comparing Coalesce's own .proto files with the official packages' descriptors.

Coalesce speaks other projects' wire formats through protos/*.proto, written from the
published definitions. Two messages are byte-compatible when every field they share
has the same number, type, label and packing; these helpers walk our descriptors and
find the twin of each field, enum value and service method in the official pool.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor


def messages(container: FileDescriptor | Descriptor) -> Iterator[Descriptor]:
    types = (
        container.message_types_by_name.values()
        if isinstance(container, FileDescriptor)
        else container.nested_types
    )
    for message in types:
        if message.GetOptions().map_entry:
            continue  # a map's entry: compared through its field
        yield message
        yield from messages(message)


def enums(container: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from container.enum_types_by_name.values()
    for message in messages(container):
        yield from message.enum_types


def field_facts(field) -> tuple:
    kind = field.message_type or field.enum_type
    if field.message_type is not None and kind.GetOptions().map_entry:  # map<k, v>: k and v
        kind = tuple(field_facts(f) for f in kind.fields)
    elif kind is not None:
        kind = kind.full_name
    oneof = field.containing_oneof
    return (
        field.number,
        field.type,
        field.is_repeated,
        field.has_presence,
        field.is_packed,
        kind,
        oneof.name if oneof else None,
        field.json_name,
    )


def field_problems(ours: Descriptor, official: Descriptor) -> list[str]:
    """Fields of `ours` that are missing from, or differ from, `official`."""
    problems = []
    names = official.fields_by_name  # (upb's .get() on this map is broken)
    for field in ours.fields:
        if field.name not in names:
            problems.append(f"{ours.full_name}.{field.name} is not an official field")
        elif field_facts(field) != field_facts(names[field.name]):
            problems.append(
                f"{ours.full_name}.{field.name}: ours {field_facts(field)}, "
                f"official {field_facts(names[field.name])}"
            )
    return problems


def method_problems(ours, official) -> list[str]:
    """Methods of service `ours` whose name or types differ from `official`'s."""
    problems = []
    for method in ours.methods:
        twin = official.methods_by_name.get(method.name) if official else None
        if twin is None:
            problems.append(f"{ours.full_name}.{method.name} is not an official method")
            continue
        for side in ("input_type", "output_type"):
            if getattr(method, side).full_name != getattr(twin, side).full_name:
                problems.append(f"{ours.full_name}.{method.name}: {side} differs")
        streaming = (method.client_streaming, method.server_streaming)
        if streaming != (twin.client_streaming, twin.server_streaming):
            problems.append(f"{ours.full_name}.{method.name}: streaming differs")
    return problems
