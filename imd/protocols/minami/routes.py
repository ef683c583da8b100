"""Where minami lives on the web port: ``/im/`` and ``/whisperIM/`` (register, login,
friends/*, and the chat page at ``www/v1/chat.html``)."""

from __future__ import annotations

from pathlib import Path

from twisted.web import resource, static
from twisted.web.pages import forbidden

from imd.protocols.minami.http import MinamiHttp
from imd.protocols.minami.ws import MinamiService, login_resource

WWW = Path(__file__).parent / "www"
PREFIXES = (b"im", b"whisperIM")


def mount(root: resource.Resource, service: MinamiService) -> None:
    http = MinamiHttp(service.accounts, service.friends)
    login = login_resource(service)
    pages = static.File(str(WWW))
    pages.directoryListing = forbidden
    for prefix in PREFIXES:
        base = resource.Resource()
        root.putChild(prefix, base)
        base.putChild(b"login", login)
        http.mount(base)
        www = resource.Resource()
        base.putChild(b"www", www)
        www.putChild(b"v1", pages)
