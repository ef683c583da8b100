"""Uploads in bounded memory: concurrent uploads of the maximum size are spooled to files
and parsed from them, so the daemon's resident memory grows by far less than their total."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from tests.conftest import unique
from tests.test_media import make_png
from tests.test_xuanxuan import login as xuanxuan_login
from tests.wire import http, post_file


@pytest_twisted.ensureDeferred
async def test_form_fields_of_other_paths_still_parsed(daemon):
    # twisted.web's own form parsing is off; a multipart or urlencoded login form still works.
    account = unique("form")
    await daemon.user(account, password="pw")
    boundary = "b" + unique()
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n"
                   f"{v}\r\n" for k, v in (("account", account), ("password", "pw")))
    body += f"--{boundary}--\r\n"
    r = await http("POST", f"http://127.0.0.1:{daemon.web}/login", body.encode(),
                   {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.json().get("token"), r.body
    r = await http("POST", f"http://127.0.0.1:{daemon.web}/login",
                   f"account={account}&password=pw".encode(),
                   {"Content-Type": "application/x-www-form-urlencoded"})
    assert r.json().get("token"), r.body

SIZE = 6_000_000
N = 6


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest_twisted.ensureDeferred
async def test_concurrent_maximum_uploads_in_bounded_memory(fresh_daemon):
    d = fresh_daemon("--max-upload", str(SIZE + 10_000)).start()
    _, token = await d.user(unique("up"))
    uid_a, a, login_a, _ = await xuanxuan_login(d)
    uid_b, b, _, _ = await xuanxuan_login(d)
    gid = (await a.call("create", ["mem-" + unique(), "files", "group", [uid_a, uid_b]]))[
        "data"]["gid"]
    png = make_png(64, 48)
    png += b"\x01" * (SIZE - len(png))
    blob = bytes(range(256)) * (SIZE // 256)

    async def boss():
        r = (await post_file(d.web, "/upload/writev2", png, query=f"?token={token}")).json()
        assert r["code"] == 0 and r["data"].endswith("-64x48.png"), r
        return r["data"]

    async def xuanxuan():
        r = (await post_file(d.web, "/sys/attach-upload.json", blob, filename="big.bin",
                             field="files[]", query=f"?rid={login_a['sid']}&gid={gid}")).json()
        assert r["result"] == "success", r
        return r["data"][0]["id"]

    await boss()  # warm up: thread pool, imports, buffers
    await xuanxuan()
    pid = d.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = status_kb(pid, "VmRSS")
    results = await defer.gatherResults(
        [defer.ensureDeferred(job()) for job in [boss, xuanxuan] * (N // 2)])
    growth = status_kb(pid, "VmHWM") - before
    # Less than one upload's size for all of them (the body held in memory and parsed twice
    # took several times N x SIZE).
    assert growth * 1024 < SIZE, f"peak RSS grew by {growth} kB"

    # Everything arrived whole.
    url = results[0]
    got = await http("GET", url)
    assert got.status == 200 and got.body == png
    fid = results[1]
    got = await http("GET", f"http://127.0.0.1:{d.web}/sys/attach-download-{fid}.json"
                            f"?rid={login_a['sid']}")
    assert got.status == 200 and got.body == blob
    a.client.close()
    b.client.close()
