"""Uploads are stored with the media type of what they are, sniffed from their bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from .support import sine_wav


def flac_bytes() -> bytes:
    buf = io.BytesIO()
    t = np.arange(36000) / 24000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000, format="FLAC")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "sent_as", "stored_as"),
    [
        (sine_wav(), "application/octet-stream", "audio/wav"),  # what browsers and curl -F often send
        (sine_wav(), "audio/mpeg", "audio/wav"),  # a wrong claim is corrected too
        (flac_bytes(), "application/octet-stream", "audio/flac"),
    ],
)
def test_upload_is_stored_as_what_it_is(client, data, sent_as, stored_as):
    response = client.post("/api/v1/files/upload", files={"file": ("clip.bin", data, sent_as)})
    assert response.status_code == 201, response.text
    assert response.json()["media_type"] == stored_as
    file_id = response.json()["file_id"]
    metadata = client.get(f"/api/v1/files/{file_id}", headers={"accept": "application/json"})
    assert metadata.json()["media_type"] == stored_as
    content = client.get(f"/api/v1/files/{file_id}/content")
    assert content.headers["content-type"].startswith(stored_as) and content.content == data
