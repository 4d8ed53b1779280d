"""Server reflection under both service names clients use: ``grpc.reflection.v1`` and ``v1alpha``.

``grpcio-reflection`` ships only the ``v1alpha`` service. ``v1`` is the same protocol (its
messages are field-for-field identical, so the bytes on the wire are the same) under another
package name, and current clients (grpcurl, Postman, grpc-js tools) ask for ``v1`` first. So
the ``v1`` file descriptor is derived from the ``v1alpha`` one (package renamed) and added to
the descriptor pool, and one servicer answers both service names.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["enable_reflection", "V1_SERVICE", "V1ALPHA_SERVICE"]

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default pool (once), built from v1alpha's."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    fd = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fd)
    old = f".{fd.package}."
    fd.name, fd.package = _V1_FILE, "grpc.reflection.v1"
    for msg in fd.message_type:
        for f in msg.field:
            if f.type_name.startswith(old):
                f.type_name = ".grpc.reflection.v1." + f.type_name[len(old):]
    for svc in fd.service:
        for m in svc.method:
            m.input_type = m.input_type.replace(old, ".grpc.reflection.v1.")
            m.output_type = m.output_type.replace(old, ".grpc.reflection.v1.")
    pool.Add(fd)


def enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` (plus both reflection services) on ``server``."""
    _register_v1_descriptor()
    names = tuple(service_names) + (V1ALPHA_SERVICE, V1_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in (V1ALPHA_SERVICE, V1_SERVICE):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))
