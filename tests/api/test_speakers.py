"""GET /api/v1/speakers: what each model speaks, read from its config without loading it."""

from __future__ import annotations

import shutil

from .support import BASE_17, CUSTOM_06, CUSTOM_17, DESIGN_17


def by_name(body: dict) -> dict[str, dict]:
    return {model["name"]: model for model in body["models"]}


def test_speakers_and_languages_of_every_model_without_loading_one(client):
    body = client.get("/api/v1/speakers").json()
    assert body["defaults"] == {"custom_voice": CUSTOM_17, "voice_design": DESIGN_17, "voice_clone": BASE_17}
    models = by_name(body)
    custom = models[CUSTOM_17]
    assert custom["model_type"] == "custom_voice" and custom["size"] == "1b7" and custom["accepts_instruct"] is True
    speakers = custom["speakers"]
    assert speakers == sorted(speakers) and {"vivian", "ryan", "uncle_fu"} <= set(speakers)
    assert custom["languages"][0] == "auto" and "english" in custom["languages"]
    assert not any("dialect" in language for language in custom["languages"])
    assert models[CUSTOM_06]["accepts_instruct"] is False  # 0.6B CustomVoice ignores instruct
    assert models[BASE_17]["model_type"] == "base" and models[BASE_17]["speakers"] == []
    assert models[DESIGN_17]["model_type"] == "voice_design"
    assert {model["state"] for model in body["models"]} == {"available"}  # nothing was loaded to answer


def test_a_loaded_model_answers_as_its_config_does(client):
    before = by_name(client.get("/api/v1/speakers").json())[CUSTOM_06]
    assert client.post(f"/api/v1/models/{CUSTOM_06}/load").status_code == 200
    after = by_name(client.get("/api/v1/speakers").json())[CUSTOM_06]
    assert after["state"] == "loaded"
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before.items() if k != "state"}
    described = client.get(f"/api/v1/models/{CUSTOM_06}").json()
    assert described["speakers"] == after["speakers"] and described["languages"] == after["languages"]


def test_a_model_not_on_disk_is_listed_with_unknowns(make_client, tiny_models_dir, tmp_path):
    models_dir = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models_dir, ignore=shutil.ignore_patterns(BASE_17))
    (models_dir / CUSTOM_06 / "config.json").write_text("{not json")
    models = by_name(make_client(models_dir=models_dir).get("/api/v1/speakers").json())
    assert models[BASE_17]["speakers"] is None and models[BASE_17]["model_type"] is None
    assert models[CUSTOM_06]["languages"] is None  # an unreadable config: unknown, not an error
    assert models[CUSTOM_17]["speakers"]
