"""Our minami chat page in a real headless Chromium: two users register, befriend, chat."""

from __future__ import annotations

import json

import pytest_twisted

from tests.conftest import unique



async def register_and_login(page, account: str, name: str) -> None:
    await page.wait_for("document.readyState === 'complete' && "
                        "document.getElementById('reg-account') !== null")
    for field, value in [("reg-account", account), ("reg-password", "pw"),
                         ("reg-name", name), ("reg-mail", f"{account}@example.org")]:
        await page.fill(field, value)
    await page.click("#reg-submit")
    await page.wait_for("document.getElementById('reg-result').textContent.includes("
                        "'Registered')")
    await page.fill("login-password", "pw")
    await page.click("#login-submit")
    await page.wait_for(f"document.getElementById('status').textContent.startsWith("
                        f"{json.dumps(name)})")


@pytest_twisted.ensureDeferred
async def test_two_users_register_befriend_and_chat(daemon, browser):
    url = f"http://127.0.0.1:{daemon.web}/im/www/v1/chat.html"
    alice, bob = await browser.page(url), await browser.page(url)
    alice_name, bob_name = unique("Alice"), unique("Bob")
    await register_and_login(alice, unique("alice"), alice_name)
    await register_and_login(bob, unique("bob"), bob_name)

    await bob.fill("find-name", alice_name)
    await bob.click("#find-submit")
    await bob.click("#found button.ask")
    await bob.wait_for("document.querySelector('#found button.ask').textContent === "
                       "'Requested'")
    await alice.wait_for(f"document.getElementById('requests').textContent.includes("
                         f"{json.dumps(bob_name)})")
    await alice.click("#requests button.accept")
    await alice.wait_for("document.querySelectorAll('#friends li').length === 1")
    assert bob_name in await alice.text("#friends")

    await alice.click("#friends .friend")
    await alice.fill("message", "hello bob, 你好")
    await alice.click("#send")
    await bob.wait_for("document.getElementById('friends').textContent !== ''")
    await bob.click("#friends .friend")
    await bob.wait_for("document.getElementById('log').textContent.includes('hello bob, 你好')")
    await bob.fill("message", "hi alice <b>not bold</b>")
    await bob.click("#send")
    await alice.wait_for("document.getElementById('log').textContent.includes("
                         "'hi alice <b>not bold</b>')")
    assert await alice.js("document.querySelector('#log b') === null")  # text, not HTML
    assert await alice.js("document.querySelectorAll('#log .failed').length") == 0
    alice.close()
    bob.close()
