"""Administration in a real browser (Debian's chromium) on the portal started as a user starts it: a backend an
admin restricted is not offered to a browser that is not listed (one arriving from the network, not signed in),
while this machine's (admin) browser sees it; and the Admin page's tabs render."""

from __future__ import annotations

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, need_chromium, running_portal
from faulty_openai_server import FaultyServer
from test_browser import lan_address

from glm_core.admin import Admin

pytestmark = pytest.mark.browser


@pytest.fixture
def page(output_dir, request):
    from playwright.sync_api import sync_playwright

    need_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            yield page
        finally:
            page.screenshot(path=str(output_dir / f"{request.node.name}.png"), full_page=True)
            browser.close()


def offered_models(page) -> list[str]:
    from playwright.sync_api import expect

    select = (
        page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").filter(has_text="Model for this conversation")
    )
    expect(select).to_have_count(1, timeout=120_000)
    select.click()
    options = page.get_by_role("option")
    expect(options.first).to_be_visible()
    names = options.all_inner_texts()
    page.keyboard.press("Escape")
    return sorted(n.strip() for n in names)


def test_a_restricted_backend_is_not_offered_to_a_browser_not_listed(page, output_dir, tmp_path):
    from playwright.sync_api import expect

    lan = lan_address()
    if lan is None:
        pytest.skip("this machine has no non-loopback IPv4 address to arrive from")
    server = FaultyServer().start()
    try:
        data = tmp_path / "data"
        admin = Admin(data)
        admin.backend_access.restrict("big", ["alice@example.com", "group:ml"], by="test")
        admin.close()
        backends = "; ".join(f"{name}={server.url}#words" for name in ("open", "big", "other"))
        env = {"GLM_DATA_DIR": str(data), "GLM_BACKENDS": backends}
        with running_portal(output_dir, env, "streamlit-admin-access.log", address=None) as (url, _, _):
            port = url.rsplit(":", 1)[1]
            page.goto(f"http://{lan}:{port}")  # from the network: a user, not signed in, not listed
            assert offered_models(page) == ["open", "other"]
            page.goto(url)  # this machine's browser: an admin
            assert offered_models(page) == ["big", "open", "other"]
            page.goto(f"{url}/Admin")
            expect(page.get_by_role("tab", name="Backends")).to_be_visible(timeout=60_000)
            page.get_by_role("tab", name="Backends").click()
            expect(page.get_by_text("Who may use big")).to_be_visible()
    finally:
        server.stop()
