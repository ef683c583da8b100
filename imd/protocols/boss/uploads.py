"""66boss uploads: ``/upload/writev1`` (audio), ``writev2`` (image or audio), ``writev3``
(video), also without the ``/upload`` prefix; multipart field ``file``.

The content is sniffed (imd.media), never trusted from the client; the stored name is ours:
``<32 hex>-<seconds>.<ext>`` for audio and ``<32 hex>-<w>x<h>.<ext>`` for images and videos.
Files are served back at ``/upload/files/<name>``.  Replies: ``{"code": 0, "message": "OK",
"data": URL}``; failures a non-zero code (400 no file, 401 no/bad token, 413 too large,
415 not the expected kind of media) and a message.  The token is read as for the group API;
the app sends none, so with ``--boss-auth=address`` an upload without a token is accepted
from an address with a recent proof or a bound 66boss connection (proofs.py).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from twisted.internet import threads
from twisted.web import resource, server, static
from twisted.web.pages import forbidden, notFound

from imd import forms, media
from imd.protocols.boss.connection import BossService
from imd.protocols.boss.http import token_of
from imd.protocols.boss.proofs import source_host
from imd.web import AsyncJSONResource, public_base

ACCEPTS = {"writev1": ("audio",), "writev2": ("image", "audio"), "writev3": ("video",)}
FILES_PATH = "/upload/files/"
UPLOAD_PATHS = tuple(f"/{name}".encode() for name in ACCEPTS)  # the bodies that may be big


class Uploads:
    def __init__(self, service: BossService, directory: Path):
        self.service = service
        self.directory = directory
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        forms.clean(self.directory)

    async def _caller_ok(self, request: server.Request) -> bool:
        mode = self.service.config.boss_auth
        if mode == "trust":
            return True
        host = source_host(request.getClientAddress())
        token = token_of(request)
        if token:
            return await self.service.token_user(token, host) is not None
        # The app uploads without any token: accept what comes from an address that
        # proved to be some user recently (or has a bound connection now).
        return mode == "address" and self.service.proofs.host_known(host)

    def handler(self, endpoint: str):
        kinds = ACCEPTS[endpoint]

        async def upload(request: server.Request):
            if request.method != b"POST":
                return 200, {"code": 400, "message": "POST a multipart form with a file field"}
            try:  # the form fields may hold the token: parse first
                parts = await forms.upload_parts(request, self.directory)
            except forms.FormError:
                parts = []
            try:
                return await self._store(request, parts, endpoint, kinds)
            finally:
                forms.discard(parts)  # what was not moved into place

        return upload

    async def _store(self, request: server.Request, parts: list[forms.Part], endpoint: str,
                     kinds: tuple[str, ...]):
        if not await self._caller_ok(request):
            return 200, {"code": 401, "message": "a valid token is required"}
        part = next((p for p in parts if p.name == "file" and p.path is not None), None)
        if part is None or not part.size:
            return 200, {"code": 400, "message": "no file in multipart field 'file'"}
        if part.size > self.service.config.max_upload:
            return 200, {"code": 413, "message": "file too large"}
        info = await threads.deferToThread(media.probe_file, part.path)
        if info is None or info.kind not in kinds:
            return 200, {"code": 415, "message": f"{endpoint} takes {' or '.join(kinds)} files"}
        name = f"{secrets.token_hex(16)}-{info.suffix()}.{info.ext}"
        await threads.deferToThread(os.replace, part.path, self.directory / name)
        part.path = None
        url = public_base(request, self.service.config.public_url) + FILES_PATH + name
        return 200, {"code": 0, "message": "OK", "data": url}

    def files_resource(self) -> resource.Resource:
        files = static.File(str(self.directory))
        files.contentTypes.update({".amr": "audio/amr", ".m4a": "audio/mp4",
                                   ".webm": "video/webm", ".3gp": "video/3gpp",
                                   ".webp": "image/webp", ".opus": "audio/ogg"})
        files.directoryListing = forbidden
        return _NoSniff(files)


def _bad_name(path: bytes) -> bool:
    """Stored names are printable ASCII: anything else (NUL, not UTF-8, a dot file, a
    separator) is no file, before static.File makes it an OS error or a logged traceback."""
    return not path or path.startswith(b".") or b"/" in path or not path.isascii() or \
        not path.decode("ascii").isprintable()


class _NoSniff(resource.Resource):
    """Serves the wrapped static files with ``X-Content-Type-Options: nosniff``."""

    def __init__(self, files: static.File):
        super().__init__()
        self.files = files

    def getChild(self, path, request):
        request.setHeader(b"x-content-type-options", b"nosniff")
        if _bad_name(path):
            return notFound()
        return self.files.getChild(path, request)

    def render(self, request):
        return forbidden().render(request)


def mount(root: resource.Resource, service: BossService, data_dir: Path) -> None:
    uploads = Uploads(service, data_dir / "uploads")
    upload = resource.Resource()
    root.putChild(b"upload", upload)
    for endpoint in ACCEPTS:
        handler = AsyncJSONResource(uploads.handler(endpoint))
        upload.putChild(endpoint.encode(), handler)
        root.putChild(endpoint.encode(), handler)
    upload.putChild(b"files", uploads.files_resource())
