"""The metadata database goes away under a running server: requests that need it get 503
storage_unavailable with Retry-After (not an internal error), and the server serves again once the
database is back. The outage is real: the server talks to PostgreSQL through a TCP relay that the test
closes (every connection and the listening port) and opens again."""

from __future__ import annotations

import sqlalchemy as sa

from .support import error_of


def test_a_database_outage_is_a_503_to_retry_and_the_server_serves_again(postgres_relay, make_client):
    relay, through_relay = postgres_relay
    client = make_client(database_url=through_relay)
    assert client.get("/api/v1/jobs").status_code == 200

    relay.close()  # the database goes away
    response = client.get("/api/v1/jobs")
    assert response.status_code == 503, response.text
    assert error_of(response)["type"] == "storage_unavailable" and response.headers["retry-after"] == "5"

    relay.open()  # and comes back, on the same port
    assert client.get("/api/v1/jobs").status_code == 200


def test_a_database_error_that_is_no_outage_stays_an_internal_error(make_client, postgres_url):
    client = make_client(database_url=postgres_url)
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:  # a lasting fault, not an outage: retrying would not help
        conn.execute(sa.text("DROP TABLE job_items"))
    engine.dispose()
    response = client.post("/api/v1/jobs", json={"items": [{"text": "Hi."}], "options": {"speaker": "vivian"}})
    assert response.status_code == 500, response.text
    assert error_of(response)["type"] == "internal_error"
