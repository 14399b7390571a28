"""Transport addresses: ``host:port`` (IPv4 or a name), ``[v6]:port`` and ``unix:/path``."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Address:
    """A transport endpoint: ``tcp`` (host, port; IPv4 or IPv6) or ``unix`` (path)."""

    family: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``unix:/path``, ``host:port``, ``1.2.3.4:port`` or ``[::1]:port``; ValueError otherwise."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError(f"empty unix socket path in {text!r}")
        return Address("unix", path=path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad IPv6 address {text!r}: expected [host]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"bad address {text!r}: expected host:port, [v6]:port or unix:/path")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return Address("tcp", host=host, port=port)



def socket_for(addr: Address) -> tuple[socket.socket, object]:
    """An unconnected stream socket for ``addr`` and the address to bind or connect it to."""
    if addr.family == "unix":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), addr.path
    infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {addr}")
    family, stype, proto, _, sockaddr = infos[0]
    return socket.socket(family, stype, proto), sockaddr


def is_loopback(address: Address) -> bool:
    """A Unix socket, or a TCP host that resolves only to loopback addresses (a name that does
    not resolve is not loopback)."""
    if address.family == "unix":
        return True
    try:
        return ipaddress.ip_address(address.host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address.host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    hosts = [str(info[4][0]).split("%")[0] for info in infos]  # drop an IPv6 scope id
    return bool(hosts) and all(ipaddress.ip_address(h).is_loopback for h in hosts)


def peer_is_loopback(sock: socket.socket) -> bool:
    """The connected peer of ``sock`` is on this host: a Unix socket, or a loopback IP address (an
    IPv4 address mapped into IPv6 counts as the IPv4 one)."""
    if sock.family == socket.AF_UNIX:
        return True
    try:
        ip = ipaddress.ip_address(str(sock.getpeername()[0]).split("%")[0])
    except (OSError, ValueError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


__all__ = ["Address", "is_loopback", "parse_address", "peer_is_loopback", "socket_for"]
