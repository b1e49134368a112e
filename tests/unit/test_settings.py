"""Settings: the sample local.settings.json lists exactly the settings the model reads, and they load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
HOST_ONLY = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsStorage"}


def model_setting_names() -> set[str]:
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= {f"{name}__{sub}".upper() for sub in annotation.model_fields}
        else:
            names.add(name.upper())
    return names


def sample_values() -> dict[str, str]:
    return json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]


def test_sample_lists_every_setting_and_nothing_else():
    sample = {k.upper() for k in sample_values() if k not in HOST_ONLY}
    assert sample == model_setting_names()


def test_sample_values_load_into_the_model(monkeypatch):
    for key, value in sample_values().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    settings = Settings()
    assert settings.dataverse.url.startswith("https://")
    assert settings.arcgis.batch_size == 250
    assert settings.syncline_schedule == "0 */15 * * * *"
    assert settings.syncline_webhook_secret.get_secret_value() in settings.secrets()
    assert "client secret" not in repr(settings)  # secrets are masked in reprs


def test_bad_values_get_a_clear_error(monkeypatch):
    monkeypatch.setenv("DATAVERSE__BATCH_SIZE", "5000")
    with pytest.raises(ValueError, match="batch_size"):
        Settings()
    monkeypatch.delenv("DATAVERSE__BATCH_SIZE")
    monkeypatch.setenv("SYNCLINE_FLOWS", "/nonexistent/specs")
    with pytest.raises(ValueError, match="does not exist"):
        Settings()
