"""xuanxuan's HTTP side on the web port: ``index.php?mode=getconfig`` (where the socket is),
file upload and download (``sys/attach-upload.json``, ``sys/attach-download-<id>.json`` and
the ``index.php?m=attach&f=upload|download`` forms, also under ``/sys/``).

Files are only for members of the chat; the session id (``rid``, the ``sid`` of the socket
login) says who is asking.  Stored names are generated; the title is the client's file name.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import defer, threads
from twisted.web import resource, server, static
from twisted.web.pages import notFound

from imd.chats import ChatError
from imd.protocols.xuanxuan.socket import XuanxuanService
from imd import forms
from imd.web import AsyncJSONResource, arg, public_base

DOWNLOAD_RE = re.compile(rb"^attach-download-(\d{1,18})\.json$")
UPLOAD_MARKERS = (b"attach-upload", b"f=upload")  # request bodies that may be uploads


class XuanxuanHttp:
    def __init__(self, service: XuanxuanService, directory: Path, socket_port):
        self.service = service
        self.directory = directory
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        forms.clean(self.directory)
        self.socket_port = socket_port  # callable: the socket listener's port, or None

    def _reply(self, method: str, result: str, data, message: str = "") -> tuple[int, dict]:
        return 200, {"module": "attach", "method": method, "result": result,
                     "message": message, "data": data}

    async def getconfig(self, request: server.Request):
        # The 1.0 client connects its socket to ``ip`` (unless it is 127.0.0.1, then to the
        # host it asked) at ``port``; it reaches this web port by host name only, so on port
        # 80 (443), directly or through a proxy: --public-url, else the Host it asked.
        host = urlsplit(public_base(request, self.service.config.public_url)).hostname or \
            request.getHost().host
        now = int(time.time())
        return 200, {
            "version": "1.0.0", "requestType": "PATH_INFO", "requestFix": "-",
            "moduleVar": "m", "methodVar": "f", "viewVar": "t", "sessionVar": "rid",
            "sessionName": "rid", "sessionID": secrets.token_hex(16), "rand": now % 10000,
            "expiredTime": 86400, "serverTime": now, "name": "ranzhi", "ip": host,
            "port": self.socket_port(), "chatPort": self.socket_port()}

    async def _user(self, request) -> int | None:
        return await self.service.accounts.user_for_token(arg(request, "rid") or "")

    async def upload(self, request: server.Request):
        uid = await self._user(request)
        if uid is None:
            return self._reply("upload", "fail", "login first (rid)", "denied")
        if request.method != b"POST":
            return self._reply("upload", "fail", "POST a multipart form")
        try:
            parts = await forms.upload_parts(request, self.directory)
        except forms.FormError:
            return self._reply("upload", "fail", "POST a multipart form")
        try:
            return await self._store(request, uid, parts)
        finally:
            forms.discard(parts)  # what was not moved into place

    async def _store(self, request: server.Request, uid: int, parts: list[forms.Part]):
        gid = next((p.value.decode("utf-8", "replace") for p in parts
                    if p.name == "gid" and p.path is None), arg(request, "gid") or "")
        files = [p for p in parts if p.name in ("files[]", "files") and p.filename
                 and p.path is not None]
        if not files:
            return self._reply("upload", "fail", "no file in files[]")
        try:
            chat = await self.service.chats.resolve(gid, uid)
            self.service.chats.require_member(chat, uid)
        except ChatError as e:
            return self._reply("upload", "fail", str(e))
        stored = []
        for part in files:
            if part.size > self.service.config.max_upload:
                return self._reply("upload", "fail", "file too large")
            name = secrets.token_hex(16)
            await threads.deferToThread(os.replace, part.path, self.directory / name)
            part.path = None
            title = Path(part.filename.replace("\\", "/")).name[:200] or "file"
            fid = await self.service.store.add_file(chat.gid, title, part.size, uid, name)
            stored.append({"id": fid, "title": title})
        return self._reply("upload", "success", stored)

    async def download_check(self, request: server.Request, fid: int) -> dict | None:
        uid = await self._user(request)
        info = await self.service.store.get_file(fid)
        if uid is None or info is None:
            return None
        try:
            chat = await self.service.chats.resolve(info["gid"], uid)
            self.service.chats.require_member(chat, uid)
        except ChatError:
            return None
        return info


class Download(resource.Resource):
    isLeaf = True

    def __init__(self, http: XuanxuanHttp, fid: int | None):
        super().__init__()
        self.http = http
        self.fid = fid

    def render_GET(self, request):
        fid = self.fid
        if fid is None:
            text = arg(request, "fileID") or arg(request, "id") or ""
            fid = int(text) if text.isdigit() and len(text) <= 18 else 0

        async def serve():
            info = await self.http.download_check(request, fid)
            if info is None:
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"module":"attach","method":"download","result":"fail",'
                              b'"message":"no such file, or not yours to read"}')
                request.finish()
                return
            request.setHeader(b"content-disposition",
                              f'attachment; filename="{_ascii(info["title"])}"'.encode())
            request.setHeader(b"x-content-type-options", b"nosniff")
            static.File(str(self.http.directory / info["name"]),
                        defaultType="application/octet-stream").render_GET(request)

        defer.ensureDeferred(serve())
        return server.NOT_DONE_YET


def _ascii(title: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                   for c in title)


class Index(resource.Resource):
    """``index.php``: getconfig, or the m=attach&f=upload|download forms."""

    isLeaf = True

    def __init__(self, http: XuanxuanHttp):
        super().__init__()
        self.http = http
        self.config = AsyncJSONResource(http.getconfig)
        self.upload = AsyncJSONResource(http.upload)

    def render(self, request):
        if arg(request, "mode") == "getconfig":
            return self.config.render(request)
        if arg(request, "m") == "attach" and arg(request, "f") == "upload":
            return self.upload.render(request)
        if arg(request, "m") == "attach" and arg(request, "f") == "download":
            return Download(self.http, None).render_GET(request)
        request.setResponseCode(404)
        return b'{"result":"fail","message":"unknown request"}'


class Sys(resource.Resource):
    def __init__(self, http: XuanxuanHttp, index: Index):
        super().__init__()
        self.http = http
        self.index = index
        self.upload = AsyncJSONResource(http.upload)

    def getChild(self, name, request):
        if name == b"index.php":
            return self.index
        if name == b"attach-upload.json":
            return self.upload
        m = DOWNLOAD_RE.match(name)
        if m:
            return Download(self.http, int(m.group(1)))
        return notFound()


def mount(root: resource.Resource, http: XuanxuanHttp) -> None:
    index = Index(http)
    root.putChild(b"index.php", index)
    root.putChild(b"sys", Sys(http, index))
