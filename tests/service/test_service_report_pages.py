"""A finished audit's HTML report page and pictures over HTTP, tenant-isolated."""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from report_fixtures import full_report
from servicekit import add_model_row, add_report_row, problem, submit_audit_job

from core.pictures import poison_grid_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def grid_png() -> bytes:
    tiles = [[np.full((1, 8, 8), shade, dtype=np.uint8) for shade in (0, 128, 255)]]
    return poison_grid_png(
        tiles,
        column_labels=["base 1", "poison 1", "target"],
        row_labels=["1 -> 2, success"],
        row_success=[True],
    )


def attack(name: str, asr: float) -> dict[str, Any]:
    mean_std = {"mean": 0.93, "std": 0.01}
    return {
        "attack": name,
        "poisons_per_instance": 1,
        "instances": 2,
        "successes": round(2 * asr),
        "asr": asr,
        "asr_wilson95": [0.0945, 0.9055],
        "baseline": {"successes": 0, "rate": 0.0, "wilson95": [0.0, 0.658], "re_acc": mean_std},
        "re_acc": mean_std,
        "feature_distance": {"mean": 1.25, "std": 0.0},
        "relative_feature_distance": {"mean": 0.125, "std": 0.0},
        "max_linf": 0.0313725,
        "seconds": {"craft": 1.5},
        "rows": [],
    }


def add_finished_audit(db: Any, client: Any, tenant: Any, store: Any, tmp_path: Path) -> str:
    """An audit job, its report row and its stored poison grids, as the worker leaves them."""
    model_id, job_id = submit_audit_job(db, client, tenant)
    stored = []
    for name in ("fc", "cp"):
        key = f"reports/{job_id}/poisons/{name}.png"
        source = tmp_path / f"{name}.png"
        source.write_bytes(grid_png())
        store.put_file(key, source)
        stored.append(key)
    body = {
        "created_at": "2026-01-02T03:04:05+00:00",
        "model": {
            "path": f"/v1/models/{model_id}",
            "arch": "convnet",
            "feature_dim": 128,
            "num_classes": 10,
            "defense": "none",
            "trained_on": "digits <script>",
            "weights_sha256": "0" * 64,
        },
        "dataset": {
            "name": "digits",
            "classes": [str(c) for c in range(10)],
            "split": {"train": 1437, "test": 360},
            "retrain_images": 200,
            "pool_images": 1000,
            "eval_images": 360,
        },
        "pre_acc": 0.97,
        "pre_acc_source": "measured",
        "head_init": "pretrained",
        "config": {"model": f"/v1/models/{model_id}", "pairs": [[1, 2]], "delta": 8 / 255},
        "seed": 0,
        "device": "cpu",
        "precision": "fp32",
        "instances": [],
        "attacks": {"fc": attack("fc", 0.5), "cp": attack("cp", 1.0), "bp": attack("bp", 0.0)},
        "screen": None,
        "timings": {"total": 2.0},
        "versions": {},
        "stored_artifacts": stored,  # bp has no picture
    }
    add_report_row(db, tenant.id, job_id, model_id, body)
    return job_id


def test_the_report_page_and_pictures_are_served_to_their_tenant_only(
    client, app, make_tenant, clean_db, tmp_path: Path
) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    job_id = add_finished_audit(clean_db, client, owner, app.state.store, tmp_path)
    base = f"/v1/jobs/{job_id}"

    page = client.get(f"{base}/report.html", headers=owner.headers)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<script>" not in html and "digits &lt;script&gt;" in html
    assert html.count("data:image/png;base64,") == 2 and "no poison picture stored" in html
    inlined = html.split("data:image/png;base64,", 1)[1].split('"', 1)[0]
    assert base64.b64decode(inlined) == grid_png()
    assert "50.0% (1/2)" in html and "97.00%" in html and "<svg" in html

    chart = client.get(f"{base}/pictures/asr.svg", headers=owner.headers)
    assert chart.status_code == 200 and chart.headers["content-type"] == "image/svg+xml"
    root = ElementTree.fromstring(chart.text)
    bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("class") == "bar"]
    assert len(bars) == 3

    picture = client.get(f"{base}/pictures/fc.png", headers=owner.headers)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(PNG_MAGIC) and picture.content == grid_png()
    assert Image.open(io.BytesIO(picture.content)).width >= 3 * 96

    for missing in ("bp", "nope", "..%2Ffc"):
        response = client.get(f"{base}/pictures/{missing}.png", headers=owner.headers)
        assert response.status_code == 404, (missing, response.text)

    for path in ("report.html", "pictures/asr.svg", "pictures/fc.png"):
        response = client.get(f"{base}/{path}", headers=other.headers)
        assert response.status_code == 404, (path, response.text)
        assert client.get(f"{base}/{path}").status_code == 401


def test_an_unfinished_audit_has_no_page_and_a_pretraining_job_none_at_all(
    client, make_tenant, clean_db
) -> None:
    tenant = make_tenant("a")
    model_id = str(add_model_row(clean_db, tenant.id))
    audit = client.post(
        "/v1/jobs/audit", headers=tenant.headers, json={"model_id": model_id, "dataset": "digits"}
    ).json()["id"]
    pretrain = client.post(
        "/v1/jobs/pretrain",
        headers=tenant.headers,
        json={"dataset": "digits", "arch": "convnet", "defense": "none", "recipe": "quick"},
    ).json()["id"]
    for path in ("report.html", "pictures/asr.svg", "pictures/budget.svg", "pictures/fc.png"):
        queued = client.get(f"/v1/jobs/{audit}/{path}", headers=tenant.headers)
        assert problem(queued, 409)["job_status"] == "queued", queued.text
        assert client.get(f"/v1/jobs/{pretrain}/{path}", headers=tenant.headers).status_code == 404


def test_the_budget_curve_chart_is_served_to_its_tenant_only(
    client, app, make_tenant, clean_db, tmp_path: Path
) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    model_id, job_id = submit_audit_job(clean_db, client, owner)
    report = full_report(path=f"/v1/models/{model_id}")
    add_report_row(clean_db, owner.id, job_id, model_id, report.model_dump(mode="json"))
    base = f"/v1/jobs/{job_id}"

    chart = client.get(f"{base}/pictures/budget.svg", headers=owner.headers)
    assert chart.status_code == 200, chart.text
    assert chart.headers["content-type"] == "image/svg+xml"
    root = ElementTree.fromstring(chart.text)
    lines = [e.get("class") for e in root.iter("{http://www.w3.org/2000/svg}polyline")]
    assert sorted(lines) == ["model-line", "model-line", "ref-line", "ref-line"]
    assert "BP budget curve" in "".join(root.itertext())

    asr = ElementTree.fromstring(client.get(f"{base}/pictures/asr.svg", headers=owner.headers).text)
    rects = [r.get("class") for r in asr.iter("{http://www.w3.org/2000/svg}rect")]
    assert rects.count("bar") == 2 and rects.count("ref-bar") == 2

    page = client.get(f"{base}/report.html", headers=owner.headers).text
    assert "<h2>Budget curve</h2>" in page and page.count("<svg") == 2

    for path in ("pictures/budget.svg", "report.html"):
        response = client.get(f"{base}/{path}", headers=other.headers)
        assert response.status_code == 404, (path, response.text)
        assert client.get(f"{base}/{path}").status_code == 401

    # An audit without a curve: 404, saying so.
    plain = add_finished_audit(clean_db, client, owner, app.state.store, tmp_path)
    missing = client.get(f"/v1/jobs/{plain}/pictures/budget.svg", headers=owner.headers)
    assert missing.status_code == 404
    assert "has no budget curve" in missing.text, missing.text


def test_a_report_with_fields_this_api_does_not_know_is_served_without_them(
    client, make_tenant, clean_db
) -> None:
    """A rolling deploy: a worker newer than the API stored a report with fields the API's
    models lack (at the top, in an attack, in the verdict's checks and policy). The report,
    its page, its chart and the model card are served with what the API knows, not a 500; the
    fields it knows are read as strictly as ever (core.report.read_report refuses the body)."""
    from pydantic import ValidationError

    from core.report import read_report

    owner = make_tenant("owner")
    model_id, job_id = submit_audit_job(clean_db, client, owner)
    body = full_report().model_dump(mode="json")
    body["model"]["path"] = f"/v1/models/{model_id}"
    body["added_later"] = {"anything": [1, 2]}
    body["attacks"]["fc"]["new_statistic"] = 0.5
    body["verdict"]["checks"][0]["new_note"] = "x"
    body["verdict"]["policy"]["default"]["max_new_threshold"] = 0.1
    with pytest.raises(ValidationError, match="added_later"):
        read_report(body)
    add_report_row(clean_db, owner.id, job_id, model_id, body)
    base = f"/v1/jobs/{job_id}"

    report = client.get(f"{base}/report", headers=owner.headers)
    assert report.status_code == 200, report.text
    served = report.json()["body"]
    assert "added_later" not in served and "new_statistic" not in served["attacks"]["fc"]
    assert served["attacks"]["fc"]["asr"] == body["attacks"]["fc"]["asr"]
    assert served["verdict"]["outcome"] == body["verdict"]["outcome"]
    page = client.get(f"{base}/report.html", headers=owner.headers)
    assert page.status_code == 200 and "<h2>Verdict</h2>" in page.text
    chart = client.get(f"{base}/pictures/asr.svg", headers=owner.headers)
    assert chart.status_code == 200 and "<svg" in chart.text
    card = client.get(f"/v1/models/{model_id}/card", headers=owner.headers)
    assert card.status_code == 200, card.text
    assert f"Audit job `{job_id}`" in card.text

    # A value of a known field that does not validate is still an error (the API's 500 path
    # is not widened beyond fields it does not know).
    body["attacks"]["fc"]["asr"] = "not a rate"
    with pytest.raises(ValidationError, match="asr"):
        read_report(body, newer_fields="ignore")
