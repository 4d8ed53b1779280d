"""``python -m service.healthcheck``: is the local server SERVING? (the container's HEALTHCHECK)

Reads the server's own configuration (``--config`` or ``$SPKSERVE_CONFIG``, then ``SPKSERVE_*``
variables, as ``spkserve serve`` does), so the check follows the configured gRPC port and TLS:
with ``tls_cert`` set it connects over TLS trusting that certificate, under the name the
certificate was issued for. Exit status 0 when grpc.health.v1 says SERVING, 1 otherwise (one
line on stderr saying why).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["check", "main"]


def _cert_name(pem: bytes) -> str:
    """The first DNS name of a certificate (its subject CN without one); 'localhost' failing both."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        if names:
            return names[0]
    except x509.ExtensionNotFound:
        pass
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return cn[0].value if cn else "localhost"


def check(port: int, tls_cert: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, what was seen) for the server on 127.0.0.1:``port``."""
    target = f"127.0.0.1:{port}"
    if tls_cert:
        pem = Path(tls_cert).read_bytes()
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(pem),
                                      options=[("grpc.ssl_target_name_override", _cert_name(pem))])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError as e:
            return False, f"{target}{' (TLS)' if tls_cert else ''}: {e.code().name}: {e.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {name}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from service.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m service.healthcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("SPKSERVE_CONFIG"))
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except (ConfigError, OSError) as e:
        print(f"healthcheck: {e}", file=sys.stderr)
        return 1
    ok, seen = check(cfg.port, cfg.tls_cert, args.timeout)
    if not ok:
        print(f"healthcheck: {seen}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
