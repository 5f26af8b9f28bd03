"""/docs and /redoc work without internet (their scripts come from the package) and with API keys on."""

from __future__ import annotations

import re

from qwen_tts_server.api.docs import assets_dir


def _asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']?([^"' >]+)""", html)


def test_docs_pages_load_everything_from_this_server(client):
    assert assets_dir() is not None, "fastapi-offline (the Swagger UI and ReDoc files) is not installed"
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"]
        urls = _asset_urls(response.text)
        assert urls and all(url.startswith("/docs/assets/") for url in urls), urls
        assert "cdn." not in response.text and "fonts.googleapis" not in response.text
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert "javascript" in bundle.headers["content-type"] and b"SwaggerUIBundle" in bundle.content
    assert client.get("/docs/assets/../../app.py").status_code == 404
    assert client.get("/docs/assets/nothing.js").status_code == 404


def test_docs_work_with_api_keys_and_offer_the_key_schemes(make_client):
    client = make_client(api_keys="secret")
    assert client.get("/api/v1/models").status_code == 401  # the API itself still needs the key
    assert client.get("/docs").status_code == 200  # a browser cannot send a header to open the page
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    assert client.get("/redoc").status_code == 200
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    schema = spec.json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    assert {"bearer": []} in schema["security"] and {"apiKey": []} in schema["security"]
    assert schema["paths"]["/health"]["get"]["security"] == []  # probes need no key
    assert "security" not in schema["paths"]["/api/v1/models"]["get"]  # the global requirement applies
    # What Swagger's "Try it out" sends once the key is entered under Authorize:
    assert client.get("/api/v1/models", headers={"authorization": "Bearer secret"}).status_code == 200
    assert client.get("/api/v1/models", headers={"x-api-key": "secret"}).status_code == 200


def test_without_keys_the_schema_declares_no_security(client):
    schema = client.get("/openapi.json").json()
    assert "security" not in schema and "securitySchemes" not in schema.get("components", {})
