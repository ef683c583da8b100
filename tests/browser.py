"""A headless Debian Chromium driven over the DevTools protocol (with autobahn, no extra
test dependency): open pages, run JavaScript in them, wait for conditions."""

from __future__ import annotations

import json
import re
import select
import shutil
import subprocess
import tempfile
import time

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="imd-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port = self._devtools_port()

    def _devtools_port(self, timeout: float = 30) -> int:
        deadline, seen = time.monotonic() + timeout, b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                chunk = self.proc.stderr.read1(4096)
                if not chunk:
                    break
                seen += chunk
                m = re.search(rb"DevTools listening on (ws://127\.0\.0\.1:(\d+)/\S+)", seen)
                if m:
                    self.endpoint = m.group(1).decode()
                    return int(m.group(2))
        self.close()
        raise RuntimeError(f"chromium did not start: {seen.decode(errors='replace')}")

    async def page(self, url: str) -> "Page":
        """A new tab in its own browser context (its own cookies), like a second browser."""
        browser = await Page.connect(self.port, self.endpoint)
        context = (await browser.call("Target.createBrowserContext"))["browserContextId"]
        target = await browser.call("Target.createTarget", url=url, browserContextId=context)
        browser.close()
        return await Page.connect(
            self.port, f"ws://127.0.0.1:{self.port}/devtools/page/{target['targetId']}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


class _DevTools(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        reply = json.loads(payload)
        d = self.factory.waiting.pop(reply.get("id"), None)
        if d is not None:
            d.callback(reply)


class Page:
    def __init__(self, proto: _DevTools, factory):
        self.proto = proto
        self.factory = factory
        self.serial = 0

    @classmethod
    async def connect(cls, port: int, url: str) -> "Page":
        factory = WebSocketClientFactory(url)
        factory.protocol = _DevTools
        factory.opened = defer.Deferred()
        factory.waiting = {}
        factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        return cls(await factory.opened, factory)

    async def call(self, method: str, **params) -> dict:
        self.serial += 1
        d = defer.Deferred()
        self.factory.waiting[self.serial] = d
        self.proto.sendMessage(json.dumps({"id": self.serial, "method": method,
                                           "params": params}).encode())
        reply = await d.addTimeout(15, reactor)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await task.deferLater(reactor, 0.1, lambda: None)

    async def fill(self, element_id: str, value: str) -> None:
        await self.js(f"document.getElementById({json.dumps(element_id)}).value = "
                      f"{json.dumps(value)}")

    async def click(self, selector: str) -> None:
        await self.wait_for(f"document.querySelector({json.dumps(selector)}) !== null")
        await self.js(f"document.querySelector({json.dumps(selector)}).click()")

    async def text(self, selector: str) -> str:
        return await self.js(f"document.querySelector({json.dumps(selector)}).textContent")

    def close(self) -> None:
        self.proto.sendClose()
