"""66boss uploads over real HTTP: sniffed content, generated names, the served file."""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from tests.conftest import unique
from tests.test_media import make_amr, make_mp4, make_png, make_wav
from tests.wire import get, http, post_file, post_form


async def token_of(daemon) -> str:
    return (await daemon.user(unique()))[1]


@pytest.mark.parametrize("path,sample,suffix,ext", [
    ("/upload/writev1", lambda: make_amr(150), "-3", "amr"),
    ("/upload/writev1", lambda: make_wav(2.0), "-2", "wav"),
    ("/upload/writev2", lambda: make_png(746, 750), "-746x750", "png"),
    ("/upload/writev2", lambda: make_wav(1.0), "-1", "wav"),
    ("/upload/writev3", lambda: make_mp4(w=640, h=330), "-640x330", "mp4"),
    ("/writev2", lambda: make_png(3, 4), "-3x4", "png"),
])
@pytest_twisted.ensureDeferred
async def test_upload_and_fetch(daemon, path, sample, suffix, ext):
    data = sample()
    token = await token_of(daemon)
    r = (await post_file(daemon.web, path, data, filename="../../etc/passwd",
                         query=f"?token={token}")).json()
    assert r["code"] == 0 and r["message"] == "OK", r
    url = r["data"]
    m = re.fullmatch(rf"http://127\.0\.0\.1:{daemon.web}/upload/files/([0-9a-f]{{32}})"
                     rf"{suffix}\.{ext}", url)
    assert m, url
    fetched = await http("GET", url)
    assert fetched.status == 200 and fetched.body == data
    assert fetched.header("x-content-type-options") == "nosniff"


@pytest_twisted.ensureDeferred
async def test_upload_refusals(daemon):
    token = await token_of(daemon)
    q = f"?token={token}"
    png, wav = make_png(10, 10), make_wav(1.0)
    cases = [
        ("/upload/writev1", png, "", 415),           # an image is not audio
        ("/upload/writev3", wav, "", 415),           # audio is not video
        ("/upload/writev2", b"GIF89a", "", 415),  # truncated
        ("/upload/writev2", b"#!/bin/sh\nrm -rf /\n", "", 415),
        ("/upload/writev2", png, "other", 400),      # no 'file' field
    ]
    for path, data, field, code in cases:
        r = await post_file(daemon.web, path, data, query=q, field=field or "file")
        assert r.json()["code"] == code, (path, field, r.body)
    assert (await post_file(daemon.web, "/upload/writev2", png)).json()["code"] == 401
    assert (await get(daemon.web, "/upload/writev2", token=token)).json()["code"] == 400
    big = await post_file(daemon.web, "/upload/writev2", make_png(10, 10) + b"\0" * 400_000,
                          query=q)
    assert big.status == 413
    listing = await http("GET", f"http://127.0.0.1:{daemon.web}/upload/files/")
    assert listing.status == 404 and b".png" not in listing.body  # no directory listing
    assert (await http("GET", f"http://127.0.0.1:{daemon.web}/upload/files/nope.png")
            ).status == 404


def app_parse_path(reply: dict) -> str | None:
    """ChatActivity.parsePath: ``data`` when ``code`` is 0."""
    return reply["data"] if reply.get("code") == 0 else None


def app_number_part(url: str) -> str:
    """ChatServices.getDuration / MessageAdapter's size: from the URL's FIRST '-' to the
    first '.' after it."""
    rest = url[url.index("-"):]
    return rest[rest.index("-") + 1:rest.index(".")]


@pytest_twisted.ensureDeferred
async def test_app_uploads_without_a_token_and_parses_the_url(fresh_daemon):
    d = fresh_daemon("--boss-auth", "address", "--max-upload", "300000").start()
    phone = "137" + unique("").replace("x", "")[-8:].zfill(8)
    uid, _ = await d.user(phone, password="pw")
    # Before any login from this address, and from another address after it: refused.
    assert (await post_file(d.web, "/upload/writev1", make_amr(150),
                            query="?")).json()["code"] == 401
    r = await post_form(d.web, "/ucenter/login/index", mobile_phone=phone, password="pw")
    assert r.json()["code"] == 1
    assert (await post_file(d.web, "/upload/writev2", make_png(3, 4), query="?",
                            source="127.0.0.2")).json()["code"] == 401
    # The app's upload: multipart field "file", no token, URL ending in '?'.
    for path, sample, number in [("/upload/writev1", make_amr(150), "3"),
                                 ("/upload/writev2", make_png(746, 750), "746x750"),
                                 ("/upload/writev3", make_mp4(w=640, h=330), "640x330")]:
        url = app_parse_path((await post_file(d.web, path, sample, query="?")).json())
        assert url is not None, path
        assert app_number_part(url) == number
        assert "_" not in url  # the app splits received signals on '_'
        assert (await http("GET", url)).body == sample
    await d.close_store()
