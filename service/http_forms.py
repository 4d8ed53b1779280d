"""HTTP request bodies -> RPC request messages.

Two body kinds are accepted on every POST route:
- ``application/json``: the RPC's request message in proto3 JSON (``lowerCamelCase`` names,
  bytes as base64), as ``google.protobuf.json_format`` reads it;
- ``multipart/form-data``: audio files in the route's file fields (``audio``, or ``a`` and ``b``),
  every other field a scalar of the request message by its JSON or proto name, nested fields
  dotted (``options.numSpeakers``, ``metadata.team``).

Bodies are read with a cap (``max_message_mb``, the gRPC limit): a larger body answers 413 with the
option's name, before any of it is parsed.
"""

from __future__ import annotations

import json
import re

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from service.http_context import HttpAbort

__all__ = ["read_body", "json_message", "form_message", "attach_files", "assign_field", "is_repeated", "TooLarge"]


class TooLarge(HttpAbort):
    """A request body over the size limit (HTTP 413)."""

    def __init__(self, limit: int):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"request body: larger than max_message_mb ({limit >> 20} MiB); POST longer audio as the "
                         "body to /v1/embed:stream or /v1/diarize:stream (or gRPC EmbedStream / DiarizeStream), "
                         "or raise max_message_mb")
        self.status = 413


async def read_body(request, limit: int) -> bytes:
    """The whole body, refused (``TooLarge``) as soon as it passes ``limit`` bytes (or announces it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's form parser reads the cached body
    return body


def is_repeated(f: FieldDescriptor) -> bool:
    """Whether a field is repeated (protobuf >= 5.28 says so directly; older ones by its label)."""
    flag = getattr(f, "is_repeated", None)
    return bool(flag) if flag is not None else f.label == FieldDescriptor.LABEL_REPEATED


def _bad(field: str, why: str) -> HttpAbort:
    return HttpAbort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {why}")


_NESTED = re.compile(r"Failed to parse (\w+) field: ")
_UNKNOWN = re.compile(r'Message type "(?:[\w.]+\.)?(\w+)" has no field named "([^"]*)" at "\w+\.?([\w.]*)"\.\s*'
                      r'Available Fields\(except extensions\): "\[([^\]]*)\]"')


def parse_error(e: json_format.ParseError, fallback: str, prefix: str = "") -> HttpAbort:
    """A 400 naming the field a protobuf JSON parse error is about, in the API's words.

    ``Failed to parse audio field: Failed to parse encoded field: ...`` becomes ``audio.encoded: ...``
    (``prefix.audio.encoded`` with a ``prefix``); an unknown field names the message and lists the fields it has.
    """
    text = str(e)
    path = _NESTED.findall(text)
    unknown = _UNKNOWN.search(text)
    if unknown:
        name, field, where, known = unknown.groups()
        fields = ", ".join(k.strip(" '") for k in known.split(","))
        return _bad(".".join(filter(None, [prefix, where, field])), f"{name} has no field {field!r} (it has: {fields})")
    reason = _NESTED.sub("", text).rstrip(".") or text
    return _bad(".".join(filter(None, [prefix, *path])) or fallback, reason)


def json_message(body: bytes | str, message, where: str = "body"):
    """Fill ``message`` (a request message) from proto3 JSON; 400 naming what is wrong. ``where``: what the JSON
    is (the request ``body``; a stream's ``config``, whose fields are then named ``config.<field>``)."""
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(where, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _bad(where, f"must be a JSON object ({type(message).__name__}), got {type(data).__name__}")
    _check_shapes(data, message.DESCRIPTOR, "" if where == "body" else f"{where}.")  # before the parser skips it
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as e:
        raise parse_error(e, where, "" if where == "body" else where) from None
    return message


_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")  # proto3 JSON: standard or URL-safe, padded or not
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list", dict: "an object"}


def _check_shapes(data: dict, descriptor, path: str) -> None:
    """400 naming the field, for JSON that protobuf's parser would misread rather than refuse: a bytes field's
    text that is not base64 (the parser skips characters outside the alphabet, so ``"encoded": "!!!"`` arrived as
    empty audio), a bytes field that is not text, and a message field given a string (read as a list of keys)."""
    for key, value in data.items():
        f = next((f for f in descriptor.fields if key in (f.name, f.json_name)), None)
        if f is None or value is None:
            continue  # an unknown field: the parser names it
        name = f"{path}{f.name}"
        is_map = f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
        if is_repeated(f) and not is_map and not isinstance(value, list):
            raise _bad(name, f"must be a JSON list, got {_JSON_TYPES.get(type(value), 'a value')}")
        many = is_repeated(f) and not is_map
        for i, item in enumerate(value if many else [value]):
            where = f"{name}[{i}]" if many else name
            if f.type == FieldDescriptor.TYPE_BYTES:
                if not isinstance(item, str):
                    raise _bad(where, f"must be a base64 string, got {_JSON_TYPES.get(type(item), 'a value')}")
                if not _BASE64.fullmatch(item) or len(item.rstrip("=")) % 4 == 1:
                    raise _bad(where, f"not valid base64 (proto3 JSON carries bytes as base64), got {item[:20]!r}")
            elif f.type == FieldDescriptor.TYPE_MESSAGE and not is_map \
                    and not f.message_type.full_name.startswith("google.protobuf."):
                if not isinstance(item, dict):
                    raise _bad(where, f"must be a JSON object ({f.message_type.name}), got "
                                      f"{_JSON_TYPES.get(type(item), 'a value')}")
                _check_shapes(item, f.message_type, f"{where}.")


def _field(descriptor, name: str, path: str) -> FieldDescriptor:
    for f in descriptor.fields:
        if name in (f.name, f.json_name):
            return f
    raise _bad(path, f"{descriptor.name} has no field {name!r}")


_INT_RANGES = {  # what each integer field type holds (ParseDict's own error would name only the whole form)
    FieldDescriptor.TYPE_INT32: (-2 ** 31, 2 ** 31 - 1), FieldDescriptor.TYPE_SINT32: (-2 ** 31, 2 ** 31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2 ** 32 - 1), FieldDescriptor.TYPE_INT64: (-2 ** 63, 2 ** 63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2 ** 63, 2 ** 63 - 1), FieldDescriptor.TYPE_UINT64: (0, 2 ** 64 - 1),
}


def _scalar(f: FieldDescriptor, value: str, path: str):
    """A form field's text as the JSON value of field ``f``."""
    t = f.type
    try:
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return float(value)
        if t in _INT_RANGES:
            number = int(value)
    except ValueError:
        raise _bad(path, f"must be a number, got {value[:40]!r}") from None
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        if not lo <= number <= hi:
            raise _bad(path, f"must be a {'32' if hi < 2 ** 33 else '64'}-bit integer in {lo}..{hi}, got {number}")
        return number
    if t == FieldDescriptor.TYPE_BOOL:
        if value.lower() not in ("true", "false", "1", "0"):
            raise _bad(path, f"must be true or false, got {value[:40]!r}")
        return value.lower() in ("true", "1")
    if t == FieldDescriptor.TYPE_ENUM:
        return int(value) if value.isdigit() else value
    if t == FieldDescriptor.TYPE_MESSAGE or t == FieldDescriptor.TYPE_BYTES:
        raise _bad(path, "is not a form field (send it as a file or in a JSON body)")
    return value


def assign_field(data: dict, descriptor, dotted: str, value: str) -> None:
    """Set the dotted field ``dotted`` of JSON dict ``data`` (of message ``descriptor``) from text; 400 naming it."""
    parts = dotted.split(".")
    node, desc = data, descriptor
    for i, part in enumerate(parts):
        path = ".".join(parts[:i + 1])
        f = _field(desc, part, path)
        last = i == len(parts) - 1
        if f.message_type is not None and f.message_type.GetOptions().map_entry:  # map<string, string>
            if i != len(parts) - 2:
                raise _bad(path, "give one key: name.KEY")
            entries = node.setdefault(f.json_name, {})
            if parts[-1] in entries:
                raise _bad(dotted, "is given more than once")
            entries[parts[-1]] = value
            return
        if last:
            if is_repeated(f):
                node.setdefault(f.json_name, []).append(_scalar(f, value, path))
            elif f.json_name in node:  # `pageSize=1&pageSize=2`, or `topK` and `top_k`: which one was meant?
                raise _bad(path, "is given more than once")
            else:
                node[f.json_name] = _scalar(f, value, path)
            return
        if f.message_type is None:
            raise _bad(path, "is not a message (nothing can be nested in it)")
        node, desc = node.setdefault(f.json_name, {}), f.message_type


def form_message(form, message, files: dict[str, str]):
    """Fill ``message`` from a parsed multipart form.

    ``files`` maps each file field of the route to the dotted message path its audio goes to
    (a repeated ``Audio`` field takes every file of that name). Unknown fields answer 400.
    """
    data: dict = {}
    for key, value in form.multi_items():
        if key in files:
            continue
        if not isinstance(value, str):
            raise _bad(key, f"is a file; this route takes files only in {sorted(files)}")
        assign_field(data, message.DESCRIPTOR, key, value)
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as e:
        raise parse_error(e, "form") from None
    return message


async def attach_files(form, message, files: dict[str, str]) -> int:
    """Put every uploaded file of ``files``' fields into ``message`` as encoded ``Audio``; returns the count.

    A singular destination takes exactly one file; a repeated one (``EnrollRequest.audio``) takes all.
    """
    count = 0
    for name, dotted in files.items():
        uploads = form.getlist(name)
        if not uploads:
            continue
        node, parts = message, dotted.split(".")
        for part in parts[:-1]:
            node = getattr(node, part)
        fd = node.DESCRIPTOR.fields_by_name[parts[-1]]
        if not is_repeated(fd) and len(uploads) > 1:
            raise _bad(name, f"give one file, got {len(uploads)}")
        for up in uploads:
            if isinstance(up, str):
                raise _bad(name, "must be a file upload (multipart filename=...), got a text field")
            data = await up.read()
            target = getattr(node, parts[-1])
            (target.add() if is_repeated(fd) else target).encoded = data
            count += 1
    return count
