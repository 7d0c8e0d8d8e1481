"""The README's HTTP tour through a client generated from /openapi.json
with openapi-python-client: no hand-written HTTP, only the generated
functions and models. Exits non-zero (an assertion) on any difference."""

import sys
import time
import uuid

from sluice_client import AuthenticatedClient
from sluice_client.api.default import (
    get_events,
    get_projections,
    get_projections_name_rows_key,
    get_streams_category_id,
    get_transfers_id,
    post_accounts,
    post_accounts_id_deposits,
    post_streams_category_id,
    post_transfers,
)
from sluice_client.models import (
    PostAccountsBody,
    PostAccountsIdDepositsBody,
    PostStreamsCategoryIdBody,
    PostStreamsCategoryIdBodyEventsItem,
    PostTransfersBody,
    Problem,
)

base, token = sys.argv[1], sys.argv[2]
client = AuthenticatedClient(base_url=base, token=token, raise_on_unexpected_status=True)
run = uuid.uuid4().hex[:8]
a, b = f"py-a-{run}", f"py-b-{run}"

# An append with the generic event API (expected_version none: a new stream).
event = PostStreamsCategoryIdBodyEventsItem.from_dict(
    {"type": "ledger.account.opened.v1", "data": {"owner": "ann", "currency": "EUR"}}
)
appended = post_streams_category_id.sync(
    "account", a, client=client, body=PostStreamsCategoryIdBody(events=[event], expected_version="none")
)
assert not isinstance(appended, Problem), appended
position = appended.to_dict()["version"]

# Read-your-writes on the balances read model.
row = get_projections_name_rows_key.sync("account_balances", a, client=client, min_position=position)
assert not isinstance(row, Problem), row
assert row.to_dict()["owner"] == "ann", row.to_dict()

# The same append again: a version conflict, as a problem document.
again = post_streams_category_id.sync_detailed(
    "account", a, client=client, body=PostStreamsCategoryIdBody(events=[event], expected_version="none")
)
assert again.status_code == 409 and isinstance(again.parsed, Problem), again
assert again.parsed.type_.endswith("/conflict"), again.parsed

# The ledger's own routes: open an account, deposit twice with one key.
opened = post_accounts.sync(
    client=client, body=PostAccountsBody(owner="bob", currency="EUR", id=b), idempotency_key=f"open-{run}"
)
assert not isinstance(opened, Problem), opened
for _ in range(2):
    dep = post_accounts_id_deposits.sync_detailed(
        a, client=client, body=PostAccountsIdDepositsBody(amount=1250), idempotency_key=f"dep-{run}"
    )
    assert dep.status_code == 201, dep
assert dep.headers.get("idempotent-replayed") == "true", dep.headers

# A transfer (a saga), followed to its end.
started = post_transfers.sync(client=client, body=PostTransfersBody(from_=a, to=b, amount=250))
assert not isinstance(started, Problem), started
tid = started.to_dict()["id"]
deadline = time.time() + 60
while True:
    t = get_transfers_id.sync(tid, client=client).to_dict()
    if t["state"] != "pending":
        break
    assert time.time() < deadline, t
    time.sleep(0.1)
assert t["state"] == "completed", t

# Balances after the transfer (1250 deposited once, 250 moved).
deadline = time.time() + 60
while True:
    ra = get_projections_name_rows_key.sync("account_balances", a, client=client).to_dict()
    rb = get_projections_name_rows_key.sync("account_balances", b, client=client).to_dict()
    if (ra["balance"], rb["balance"]) == (1000, 250):
        break
    assert time.time() < deadline, (ra, rb)
    time.sleep(0.1)

# The aggregate's events, the log's pages, the projections' status.
events = get_streams_category_id.sync("account", a, client=client).to_dict()
assert events["events"][0]["type"] == "ledger.account.opened.v1", events
page = get_events.sync(client=client, category="account", limit=1000).to_dict()
assert any(e["stream"] == f"account/{a}" for e in page["events"]), page
names = [p["name"] for p in get_projections.sync(client=client).to_dict()["projections"]]
assert "account_balances" in names, names
print("tour ok")
