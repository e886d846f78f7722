"""Optional TLS and mutual TLS on the gRPC port, and the matching client credentials.

Server: a certificate chain and its private key (PEM). With a client CA as well, the
server requires every client to present a certificate signed by that CA (mutual TLS);
the handshake fails otherwise, before any RPC runs. Files are read once at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{what} {path!r}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path!r}: not a PEM file")
    return data


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str                      # server certificate chain (PEM)
    key_file: str                       # its private key (PEM)
    client_ca_file: str | None = None   # set: mutual TLS, clients need a certificate from this CA

    @classmethod
    def from_paths(cls, cert: str | None, key: str | None, client_ca: str | None = None) -> "TLSConfig | None":
        if not cert and not key:
            if client_ca:
                raise ValueError("tls: a client CA (mutual TLS) needs the server's --tls-cert and --tls-key")
            return None
        if not (cert and key):
            raise ValueError("tls: give both the certificate (--tls-cert) and its key (--tls-key)")
        return cls(cert, key, client_ca or None)

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.client_ca_file, "tls client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials([(_read(self.key_file, "tls key"), _read(self.cert_file, "tls cert"))],
                                           root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(ca_file: str | None = None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """Client side: trust `ca_file` (None: the system roots); present cert/key for mutual TLS."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("tls: give both the client certificate (--tls-cert) and its key (--tls-key)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "tls CA") if ca_file else None,
        private_key=_read(key_file, "tls key") if key_file else None,
        certificate_chain=_read(cert_file, "tls cert") if cert_file else None)
