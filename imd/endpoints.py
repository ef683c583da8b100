"""The ``systemd-tls:`` server endpoint: TLS on a listening socket passed by systemd.

Twisted's ``ssl:`` endpoint binds its own port, and its ``systemd:`` endpoint adopts a socket
from socket activation but speaks cleartext; port 443 without root needs both.  This one takes
the ``systemd:`` arguments (``domain``, and ``index`` or ``name``) and the certificate ones of
``ssl:`` (``privateKey``, ``certKey``, ``extraCertChain``)::

    --web systemd-tls:domain=INET:name=https:privateKey=/etc/imd/key.pem:certKey=/etc/imd/cert.pem

The plugin object is ``twisted/plugins/imd_plugin.py``'s ``systemdTLS``.
"""

from __future__ import annotations

import re

from twisted.internet import ssl
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Any stream server endpoint, its connections wrapped in TLS."""

    def __init__(self, inner: IStreamServerEndpoint, options):
        self.inner = inner
        self.options = options

    def listen(self, factory):
        return self.inner.listen(TLSMemoryBIOFactory(self.options, False, factory))


def certificate_options(privateKey: str, certKey: str | None = None,
                        extraCertChain: str | None = None) -> ssl.CertificateOptions:
    """Server TLS options from PEM files, as the ``ssl:`` endpoint reads them."""
    with open(certKey or privateKey, "rb") as f:
        cert_pem = f.read()
    with open(privateKey, "rb") as f:
        key_pem = f.read()
    chain = []
    if extraCertChain:
        with open(extraCertChain, "rb") as f:
            chain = [ssl.Certificate.loadPEM(pem).original
                     for pem in _CERTIFICATE.findall(f.read())]
    certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    return ssl.CertificateOptions(privateKey=certificate.privateKey.original,
                                  certificate=certificate.original, extraCertChain=chain)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class SystemdTLSParser:
    prefix = "systemd-tls"

    def parseStreamServer(self, reactor, *args: str, privateKey: str, certKey: str | None = None,
                          extraCertChain: str | None = None, **systemd: str):
        if args:
            raise ValueError("systemd-tls: takes only key=value arguments")
        inner = serverFromString(
            reactor, "systemd:" + ":".join(f"{key}={value}" for key, value in systemd.items()))
        return TLSServerEndpoint(inner, certificate_options(privateKey, certKey, extraCertChain))
