"""Property-based API testing: schemathesis generates requests from the app's own /openapi.json
(valid and invalid ones) and no response may be a server error.

Bounded to run in a few minutes on 2 CPU cores: tiny checkpoints, short texts (max_text_chars),
at most 2 s of audio per item, small batches, and a fixed number of examples per operation.
The WebSocket is not in the OpenAPI document (test_websocket.py covers it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi as schemathesis_asgi

from qwen_tts_server.api.app import create_app

from .support import settings_for

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 200
# Server errors that are the documented answer, not a failure: a model name that is not here (and
# downloads are off) is 503 model_unavailable; a request that asked for a timeout_s shorter than its
# work is 504 deadline_exceeded; /ready is 503 while starting or saturated.
ALLOWED_5XX = {("model_unavailable", 503), ("deadline_exceeded", 504)}


# The OpenAPI document does not depend on settings or models; an app that is never started gives it
# at collection time. (schemathesis.pytest.from_fixture would load it lazily, but its pytest plugin
# reads a private attribute pytest 9 no longer has.)
# Sanitization off: it would print `max_new_tokens` (a "token" key) as [Filtered] in reproductions.
CONFIG = SchemathesisConfig.from_dict({"output": {"sanitization": {"enabled": False}}})
schema = schemathesis.openapi.from_dict(
    create_app(settings_for(models_dir=Path("."), data_dir=Path("."))).openapi(), config=CONFIG
)


@pytest.fixture(scope="module")
def app(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app the generated requests go to. schemathesis runs its lifespan itself (once, on its
    own event loop) at the first call; it is stopped at the end of the module."""
    settings_ = settings_for(
        models_dir=tiny_models_dir,
        data_dir=tmp_path_factory.mktemp("schemathesis-data"),
        max_audio_seconds=2.0,
        max_text_chars=200,
        max_instruct_chars=200,
        max_items_per_request=3,
        max_upload_bytes=64 * 1024,
        ref_audio_url_timeout_s=1.0,
    )
    application = create_app(settings_)
    yield application
    schemathesis_asgi.shutdown_lifespans()  # stop the engine threads and close the file registry


def error_code(response) -> str | None:
    try:
        error = response.json().get("error", {})
    except ValueError:
        return None
    return error.get("code") or error.get("type")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible, not flaky
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case, app):
    response = case.call(app=app, timeout=60)
    status = response.status_code
    if status < 500:
        return
    if (error_code(response), status) in ALLOWED_5XX:
        return
    if case.path == "/ready" and status == 503:
        return
    pytest.fail(
        f"{case.method} {case.path} answered {status}: {response.text[:500]}\n"
        f"Reproduce with:\n    {case.as_curl_command()}"
    )
