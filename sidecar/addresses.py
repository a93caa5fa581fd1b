"""The address to advertise: what peers can reach this container on.

First choice: the preferred source address of the route toward the registry host (the
address the kernel would use to talk to it, so it is on a network that reaches the mesh).
Otherwise the first global, non-loopback address, IPv4 before IPv6.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from pymongo.uri_parser import parse_uri
from pyroute2 import IPRoute

log = logging.getLogger(__name__)

IFA_F_TENTATIVE = 0x40
IFA_F_DEPRECATED = 0x20
RT_SCOPE_UNIVERSE = 0


def registry_host(url: str) -> str | None:
    """The first host of a MongoDB URL, as an IP address when it resolves."""
    try:
        host = parse_uri(url)["nodelist"][0][0]
    except Exception:  # noqa: BLE001 - a bad URL is reported by the store, not here
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


def route_source(dst: str) -> str | None:
    """The preferred source address of the route toward ``dst``."""
    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=dst)
    except Exception as exc:  # noqa: BLE001 - netlink errors come in several kinds
        log.debug("no route toward %s: %r", dst, exc)
        return None
    for route in routes:
        src = route.get_attr("RTA_PREFSRC")
        if src:
            return str(src)
    return None


def first_global() -> str | None:
    """The first global, non-loopback, usable address (IPv4 first)."""
    with IPRoute() as ipr:
        addrs = ipr.get_addr()
    found: list[tuple[int, str]] = []
    for a in addrs:
        text = a.get_attr("IFA_ADDRESS")
        if not text or a["scope"] != RT_SCOPE_UNIVERSE:
            continue
        if a["flags"] & (IFA_F_TENTATIVE | IFA_F_DEPRECATED):
            continue
        ip = ipaddress.ip_address(text)
        if ip.is_loopback or ip.is_link_local:
            continue
        found.append((ip.version, str(ip)))
    found.sort(key=lambda f: f[0])  # stable: the kernel's order within a family
    return found[0][1] if found else None


def advertise_address(registry_url: str) -> str | None:
    host = registry_host(registry_url)
    if host is not None:
        src = route_source(host)
        if src is not None:
            return src
    return first_global()
