"""Our webim demo page in a real headless Chromium: two buddies log in, see each other,
see the typing indicator, and chat (actions with the session cookie, JSONP long-poll)."""

from __future__ import annotations


import pytest_twisted

from tests.conftest import unique
from tests.test_boss import make_group



async def log_in(page, account: str) -> None:
    await page.wait_for("document.getElementById('account') !== null")
    await page.fill("account", account)
    await page.fill("password", "pw")
    await page.click("#login-submit")
    await page.wait_for("!document.getElementById('app').classList.contains('hidden')")


@pytest_twisted.ensureDeferred
async def test_two_buddies_chat_with_typing_indicator(daemon, browser):
    alice_account, bob_account = unique("alice"), unique("bob")
    alice_id, alice_token = await daemon.user(alice_account, password="pw", name="Alice")
    bob_id, _ = await daemon.user(bob_account, password="pw", name="Bob")
    store = await daemon.store()
    await store.befriend(alice_id, bob_id, "Bob", "Alice")
    gid = await make_group(daemon, alice_id, alice_token, [bob_id])

    url = f"http://127.0.0.1:{daemon.web}/webim/demo.html"
    alice, bob = await browser.page(url), await browser.page(url)
    await log_in(alice, alice_account)
    await log_in(bob, bob_account)
    # Alice came online before Bob: she learns of him through a presence packet.
    await alice.wait_for(f"document.querySelector('#buddies li[data-id=\"{bob_id}\"] .dot.on')"
                         " !== null")
    await alice.click(f"#buddies li[data-id='{bob_id}']")
    await bob.click(f"#buddies li[data-id='{alice_id}']")
    for page in (alice, bob):
        await page.wait_for("!document.getElementById('message').disabled")
    await alice.fill("message", "h")
    await alice.js("document.getElementById('message').dispatchEvent(new Event('input'))")
    await bob.wait_for("document.getElementById('typing').textContent.includes('Alice is typing')")
    await alice.fill("message", "hello Bob <i>x</i>")
    await alice.click("#send")
    await bob.wait_for("document.getElementById('log').textContent.includes('hello Bob <i>x</i>')")
    assert await bob.js("document.querySelector('#log i') === null")
    assert await bob.text("#typing") == ""
    await bob.fill("message", "hi Alice")
    await bob.click("#send")
    await alice.wait_for("document.getElementById('log').textContent.includes('hi Alice')")
    # a room: the 66boss group both are in
    await alice.click(f"#rooms li[data-id='{gid}']")
    await bob.click(f"#rooms li[data-id='{gid}']")
    await alice.fill("message", "hello room")
    await alice.click("#send")
    await bob.wait_for("document.getElementById('log').textContent.includes('hello room')")
    alice.close()
    bob.close()


@pytest_twisted.ensureDeferred
async def test_html_names_show_as_text_and_run_nothing(daemon, browser):
    """Names come HTML-escaped (for the shipped client); the demo shows them as the user
    typed them, never as markup and never as entities."""
    evil = '<img src=x onerror="window.pwned=1">&amp; "Eve"'
    eve_account, bob_account = unique("eve"), unique("bob")
    eve_id, eve_token = await daemon.user(eve_account, password="pw", name=evil)
    bob_id, _ = await daemon.user(bob_account, password="pw", name="Bob")
    store = await daemon.store()
    await store.befriend(eve_id, bob_id, "Bob", evil)
    gid = await make_group(daemon, eve_id, eve_token, [bob_id])
    await store.edit_group(int(gid), name=evil)

    url = f"http://127.0.0.1:{daemon.web}/webim/demo.html"
    eve, bob = await browser.page(url), await browser.page(url)
    await log_in(eve, eve_account)
    await log_in(bob, bob_account)
    assert await eve.text("#status") == f"{evil} (id {eve_id})"
    label = f"#buddies li[data-id='{eve_id}'] span:last-child"
    await bob.wait_for(f"document.querySelector({label!r}) !== null")
    assert await bob.text(label) == evil
    assert await bob.text(f"#rooms li[data-id='{gid}']") == f"# {evil}"
    await eve.click(f"#buddies li[data-id='{bob_id}']")
    await eve.wait_for("!document.getElementById('message').disabled")
    await eve.fill("message", "<b>hi</b> &amp;")
    await eve.click("#send")
    await bob.click(f"#buddies li[data-id='{eve_id}']")
    await bob.wait_for("document.getElementById('log').textContent.includes('<b>hi</b> &amp;')")
    assert await bob.text("#log .who") == f"{evil}: "
    assert await bob.text("#title") == f"Chat with {evil}"
    for page in (eve, bob):
        assert await page.js("document.querySelector('#app img, #app b') === null")
        assert await page.js("window.pwned === undefined")
    eve.close()
    bob.close()


# A host page of another origin, as a host site embeds the shipped client: the client's
# requests are JSONP script elements; only `online` carries the host's credential.
HOST_PAGE = """<!doctype html><meta charset="utf-8"><title>host</title><script>
const ACTIONS = "http://127.0.0.1:%(web)d/webim/im.php?webim_action=";
let serial = 0;
function jsonp(url, params) {
  return new Promise((resolve, reject) => {
    const name = "jsonp" + (++serial);
    window[name] = resolve;
    const script = document.createElement("script");
    script.src = url + (url.includes("?") ? "&" : "?") +
      new URLSearchParams({...params, callback: name});
    script.onerror = reject;
    document.head.appendChild(script);
  });
}
const action = (name, params) => jsonp(ACTIONS + name, params || {});
async function poll(server, ticket) {
  for (;;) {
    try { if ((await jsonp(server, {ticket})).status === "stopped") return; }
    catch (e) { return; }
  }
}
async function online(params) {
  const reply = await action("online", params);
  if (reply.success) poll(reply.connection.server, reply.connection.ticket);
  return reply;
}
</script>"""


def serve_page(html: str):
    """A web server of its own (another origin than the daemon's) serving ``html``."""
    from twisted.internet import reactor
    from twisted.web import resource, server

    class Page(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return html.encode()

    return reactor.listenTCP(0, server.Site(Page()), interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_a_host_page_of_another_origin_adds_its_credential_to_online_only(daemon,
                                                                                  browser):
    """In a real browser: online (with the host's credential) sets the page key; history
    and setting, which the client sends without the ticket, then work from that page, and
    not from a page of another origin in the same browser."""
    alice_account = unique("alice")
    alice_id, alice_token = await daemon.user(alice_account, password="pw", name="Alice")
    bob_id, bob_token = await daemon.user(unique("bob"), password="pw", name="Bob")
    store = await daemon.store()
    await store.befriend(alice_id, bob_id, "Bob", "Alice")
    host = serve_page(HOST_PAGE % {"web": daemon.web})
    other = serve_page(HOST_PAGE % {"web": daemon.web})
    try:
        page = await browser.page(f"http://127.0.0.1:{host.getHost().port}/page.html")
        await page.wait_for("typeof online === 'function'")
        reply = await page.js(f"online({{token: {alice_token!r}}}).then(r => r.success)")
        assert reply is True
        await page.js(f"online({{token: {bob_token!r}}})")  # only to send Alice a message
        sent = await page.js(
            "online({token: %r}).then(r => action('message', {ticket: r.connection.ticket,"
            " to: '%d', body: 'hi <b>Alice</b>'}))" % (bob_token, alice_id))
        assert sent == "ok"
        # Bob's online set the page key to Bob's; Alice's tab logs in again, as on a reload.
        assert await page.js(f"online({{token: {alice_token!r}}}).then(r => r.success)")
        history = await page.js(f"action('history', {{id: '{bob_id}', type: 'unicast'}})")
        assert [h["body"] for h in history] == ["hi <b>Alice</b>"], history
        assert await page.js("action('setting', {data: '{\"play_sound\":false}'})") == "ok"
        assert (await store.user_fields(alice_id, "webim_setting"))["webim_setting"] == \
            '{"play_sound":false}'

        # Another origin, same browser (and the same cookies): nothing.
        await page.call("Page.navigate",
                        url=f"http://127.0.0.1:{other.getHost().port}/page.html")
        await page.wait_for("typeof action === 'function' && location.port == "
                            f"'{other.getHost().port}'")
        refused = await page.js(f"action('history', {{id: '{bob_id}'}})")
        assert refused == {"success": False, "error_msg": "Not Authorized"}
        refused = await page.js("action('setting', {data: '{}'})")
        assert refused == {"success": False, "error_msg": "Not Authorized"}
        page.close()
    finally:
        await host.stopListening()
        await other.stopListening()
