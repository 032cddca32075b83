"""The OpenAPI document says what error answers are: a ``Problem`` as
``application/problem+json``, which is the content type the handlers send."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def test_error_responses_are_documented_as_the_problems_they_are(tmp_path: Path) -> None:
    app = create_app(Settings(log_level="error", state_dir=tmp_path / "state"))
    document = app.openapi()
    documented = 0
    for path_item in document["paths"].values():
        for operation in path_item.values():
            for code, response in operation["responses"].items():
                content = response.get("content", {})
                if code.startswith(("4", "5")) and "application/problem+json" in content:
                    documented += 1
                    assert content["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"
                    }
                # No error answer is a pydantic error list, whatever FastAPI would say.
                assert "HTTPValidationError" not in str(content)
    assert documented > 20
    assert "Problem" in document["components"]["schemas"]
    with TestClient(app) as client:  # the content type sent is the one documented
        refused = client.post("/v1/recommendations", json={"channel": "cart"})
        invalid = client.post(
            "/v1/recommendations", json={"channel": "cart", "limit": -1}, headers={}
        )
    responses = document["paths"]["/v1/recommendations"]["post"]["responses"]
    for answer in (refused, invalid):
        assert answer.status_code >= 400
        assert answer.headers["content-type"].split(";")[0] == "application/problem+json"
        assert list(responses[str(answer.status_code)]["content"]) == ["application/problem+json"]
