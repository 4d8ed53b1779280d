"""The OpenAPI 3 document of the HTTP/JSON API, generated from the routes and the protobuf messages
(so it cannot drift from what the server accepts), and a self-contained page that lists it.

JSON schemas follow proto3 JSON mapping: ``lowerCamelCase`` names, 64-bit integers as strings,
bytes as base64 strings, enums as their value names, maps as objects.
"""

from __future__ import annotations

import html

from google.protobuf.descriptor import FieldDescriptor

from service.http_forms import is_repeated

__all__ = ["openapi_document", "docs_page"]

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"}, FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"}, FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def _field_schema(f: FieldDescriptor, components: dict) -> dict:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if f.message_type.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": _field_schema(f.message_type.fields_by_name["value"],
                                                                            components)}
        return {"$ref": f"#/components/schemas/{_message_schema(f.message_type, components)}"}
    if f.type == FieldDescriptor.TYPE_ENUM:
        return {"type": "string", "enum": [v.name for v in f.enum_type.values]}
    return dict(_SCALARS[f.type])


def _message_schema(desc, components: dict) -> str:
    """Add ``desc`` (and what it refers to) to ``components``; returns its schema name."""
    name = desc.name
    if name in components:
        return name
    components[name] = {}  # placeholder: recursive messages refer to it
    props = {}
    for f in desc.fields:
        s = _field_schema(f, components)
        is_map = f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
        props[f.json_name] = {"type": "array", "items": s} if is_repeated(f) and not is_map else s
    components[name] = {"type": "object", "properties": props}
    return name


def openapi_document(routes, service_descriptor, version: str) -> dict:
    """The OpenAPI 3.1 document of ``routes`` (``service.http_api.Route``) of ``service_descriptor``."""
    components: dict = {"Error": {"type": "object", "properties": {"error": {
        "type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}}
    paths: dict = {}
    for r in routes:
        method = service_descriptor.methods_by_name[r.rpc]
        out = _message_schema(method.output_type, components)
        req = _message_schema(method.input_type, components)
        op = {"operationId": r.rpc, "summary": r.summary, "tags": [r.tag],
              "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                             for p in r.path_fields],
              "responses": {"200": {"description": f"a {method.output_type.name}",
                                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{out}"}}}},
                            "default": {"description": "an error (400, 401, 403, 404, 409, 413, 429, 503)",
                                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}}
        if r.stream:
            config = method.input_type.fields_by_name["config"].message_type
            _message_schema(config, components)
            audio = {"schema": {"type": "string", "format": "binary"}}
            op["requestBody"] = {"required": True, "description": "the audio file itself (any length up to the "
                                 "server's max_stream_mb / max_stream_audio_seconds), sent as it is read",
                                 "content": {"audio/*": audio, "application/octet-stream": audio}}
            op["description"] = (f"query parameters: fields of {config.name} (nested: dotted, e.g. "
                                 "options.numSpeakers; raw PCM: pcm.sampleRate, pcm.encoding)")
        elif r.method in ("POST", "PATCH"):
            form = {"type": "object", "properties": {f: {"type": "string", "format": "binary"} for f in r.files},
                    "description": f"audio files in {', '.join(r.files) or 'no field'}; any other field of "
                                   f"{method.input_type.name} by name (nested: dotted)"}
            op["requestBody"] = {"required": True, "content": {
                "multipart/form-data": {"schema": form},
                "application/json": {"schema": {"$ref": f"#/components/schemas/{req}"}}}}
        else:
            op["description"] = f"query parameters: fields of {method.input_type.name} ({req})"
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {"openapi": "3.1.0", "info": {"title": "spkserve HTTP/JSON API", "version": version,
                                         "description": "The gRPC API's calls over HTTP: same tokens, limits and "
                                                        "errors. Bearer token in the Authorization header."},
            "paths": paths, "components": {"schemas": components,
                                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}]}


def docs_page(doc: dict) -> str:
    """A self-contained HTML page listing every route of an OpenAPI document (no scripts, no CDN)."""
    rows = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(op['summary'])}</td><td>{html.escape(body.get('description', op.get('description', '')))}</td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>spkserve API</title><style>"
            "body{font-family:sans-serif;margin:2em}td,th{border-bottom:1px solid #ddd;padding:.4em;text-align:left}"
            "</style></head><body><h1>spkserve HTTP/JSON API</h1><p>Machine-readable: <a href='/openapi.json'>"
            "/openapi.json</a>. Web console: <a href='/'>/</a>. Live verification (VerifyStream) is the WebSocket "
            "<code>/v1/verify:stream</code>: the config as JSON text, then audio as binary messages, then "
            "<code>{\"end\": true}</code>; results come back as JSON text.</p><table><tr><th>method</th><th>path</th>"
            "<th>what</th><th>body / parameters</th></tr>" + "".join(rows) + "</table></body></html>")
