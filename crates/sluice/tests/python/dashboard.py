"""Drives the dashboard at /ui in Debian's chromium (playwright, no downloaded
browser): dead letters, voiding one, the parked projection catching up, a
saga's timeline; a screenshot of each page into the given directory.

usage: dashboard.py <base-url> <token> <screenshot-dir> <bad-position> <transfer-id>
"""

import json
import sys
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

base, token, shots, bad, transfer = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]


def api(method, path, body=None):
    req = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=15) as r:
        return json.loads(r.read() or b"null")


def shot(page, name):
    page.screenshot(path=f"{shots}/{name}.png", full_page=True)


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    answers = []

    def on_dialog(d):
        # The token prompt (once: the page keeps it), a reason, a confirmation.
        answers.append((d.type, d.message))
        if d.type == "prompt" and "token" in d.message:
            d.accept(token)
        elif d.type == "prompt":
            d.accept("negative deposit")
        else:
            d.accept()

    page.on("dialog", on_dialog)

    page.goto(base + "/ui")
    expect(page.locator("text=events/s").first).to_be_visible()
    expect(page.locator("#dead-letters")).not_to_have_text("0", timeout=20_000)
    shot(page, "overview")

    # The broken event is a dead letter, with its reason.
    page.goto(base + "/ui/dlq")
    row = page.locator("tr", has=page.locator(f"td:text-is('{bad}')")).first
    expect(row).to_be_visible(timeout=20_000)
    expect(row).to_contain_text("amount")
    row.locator("button[data-act=show]").click()
    expect(page.locator("#detail")).to_contain_text("reason")
    shot(page, "dlq")

    # The projection is parked behind it.
    page.goto(base + "/ui/projections")
    parked = page.locator(".parked[data-name=account_balances]")
    expect(parked).not_to_have_text("0", timeout=20_000)
    shot(page, "projections-parked")

    # Void it: a reason, then the confirmation.
    page.goto(base + "/ui/dlq")
    row = page.locator("tr", has=page.locator(f"td:text-is('{bad}')")).first
    row.locator("button[data-act=void]").click()
    expect(page.locator("#detail")).to_contain_text("done", timeout=15_000)
    assert any(t == "confirm" for t, _ in answers), answers

    # The account takes deposits again and the projection catches up.
    account = "ui-acc-2"
    api("POST", f"/v1/accounts/{account}/deposits", {"amount": 5})
    page.goto(base + "/ui/projections")
    expect(parked).to_have_text("0", timeout=30_000)
    row = page.locator("tr", has=page.locator("td:text-is('account_balances')"))
    expect(row.locator(".bar.caught-up")).to_have_attribute("title", "100 %", timeout=30_000)

    # A rebuild, confirmed, followed to 100 %.
    confirms = sum(t == "confirm" for t, _ in answers)
    row.locator("button[data-act=rebuild]").click()
    expect(page.locator(".rebuild-state[data-name=account_balances]")).to_have_text("done 100 %", timeout=60_000)
    expect(page.locator(".bar.rebuild[data-name=account_balances]")).to_have_attribute("title", "100 %")
    assert sum(t == "confirm" for t, _ in answers) == confirms + 1, answers
    shot(page, "projections")

    # A saga's timeline.
    page.goto(base + "/ui/sagas")
    link = page.locator(f"a:text-is('{transfer}')")
    expect(link).to_be_visible(timeout=20_000)
    shot(page, "sagas")
    link.click()
    expect(page.locator("ol.timeline li").first).to_be_visible()
    shot(page, "saga")

    # Consumers: pause one, see it paused, resume it.
    page.goto(base + "/ui/consumers")
    row = page.locator("tr", has=page.locator("button[data-act=pause]")).first
    expect(row).to_be_visible(timeout=20_000)
    name = row.locator("button").get_attribute("data-name")
    row.locator("button").click()
    resume = page.locator(f"button[data-act=resume][data-name='{name}']").first
    expect(resume).to_be_visible(timeout=20_000)
    shot(page, "consumers")
    resume.click()
    expect(page.locator(f"button[data-act=pause][data-name='{name}']").first).to_be_visible(timeout=20_000)

    # The rest, for the screenshots: streams, an aggregate, the log.
    page.goto(base + "/ui/streams")
    expect(page.locator("text=Categories")).to_be_visible()
    shot(page, "streams")
    page.goto(base + f"/ui/streams/account/{account}")
    expect(page.locator("td:text-is('ledger.account.deposited.v1')").first).to_be_visible()
    shot(page, "stream")
    page.goto(base + "/ui/events")
    expect(page.locator("#log table")).to_be_visible()
    shot(page, "events")

    assert not errors, errors
    browser.close()
print("dashboard ok")
