"""GET /v1/models/{id}/card: a Hugging Face model card whose YAML front matter parses and
whose ``model-index`` carries the audit reports' numbers."""

from __future__ import annotations

import uuid
from typing import Any

import yaml
from report_fixtures import full_report
from servicekit import add_model_row
from sqlalchemy.orm import Session

from catalog.policy import Policy
from common.models import Report
from core.report import (
    AttackResult,
    AuditReport,
    BaselineResult,
    DatasetFacts,
    InstanceDraw,
    MeanStd,
    ModelFacts,
    ScreenFacts,
)
from core.verdict import decide, wilson_interval

CONFIG = {
    "dataset": "digits",
    "defense": "none",
    "recipe": "digits",
    "seed": 0,
    "epochs": 4,
    "lr": 0.1,
    "lr_gamma": 0.1,
    "milestones": [2, 3],
    "batch_size": 64,
}


def attack(name: str, successes: int, instances: int, baseline: int, poisons: int) -> AttackResult:
    return AttackResult(
        attack=name,
        poisons_per_instance=poisons,
        instances=instances,
        successes=successes,
        asr=successes / instances,
        asr_wilson95=wilson_interval(successes, instances),
        baseline=BaselineResult(
            successes=baseline,
            rate=baseline / instances,
            wilson95=wilson_interval(baseline, instances),
            re_acc=MeanStd(mean=0.91, std=0.01),
        ),
        re_acc=MeanStd(mean=0.9034, std=0.012),
        feature_distance=MeanStd(mean=1.0, std=0.1),
        relative_feature_distance=MeanStd(mean=0.5, std=0.1),
        max_linf=0.1,
        seconds={"craft": 1.0},
        rows=[],
    )


def audit_report(model_id: uuid.UUID) -> AuditReport:
    report = AuditReport(
        created_at="2026-01-01T00:00:00Z",
        model=ModelFacts(
            path=str(model_id),
            arch="convnet",
            feature_dim=128,
            num_classes=10,
            defense="none",
            trained_on="digits",
            weights_sha256="0" * 64,
        ),
        dataset=DatasetFacts(
            name="digits",
            classes=[str(i) for i in range(10)],
            split={"train": 1000, "test": 500},
            retrain_images=200,
            pool_images=800,
            eval_images=500,
        ),
        pre_acc=0.9512,
        pre_acc_source="measured",
        head_init="pretrained",
        config={
            "pairs": [[1, 7], [3, 8]],
            "targets_per_pair": 3,
            "iterations": 40,
            "delta": 8 / 255,
            "retrain_epochs": 10,
            "retrain_lr": 0.1,
            "retrain_milestones": [5, 8],
            "retrain_gamma": 0.1,
            "retrain_batch_size": 64,
        },
        seed=0,
        device="cpu",
        precision="float32",
        instances=[
            InstanceDraw(target_index=i, target_class=1, poison_class=7, base_indices=[i])
            for i in range(6)
        ],
        # 1/6 and 2/3: percents with more than one decimal, rounded to one in the card.
        attacks={
            "fc": attack("fc", 1, 6, 0, 1),
            "bp": attack("bp", 4, 6, 1, 5),
        },
        screen=ScreenFacts(
            separation=1.5, drift=0.2, normalized_drift=0.1, images=50, pgd_steps=5, delta=0.03
        ),
        timings={"total": 2.0},
        versions={"bulwark": "0.1.0"},
    )
    verdict = decide(report, Policy(default={"max_asr": 0.2}))
    return report.model_copy(update={"verdict": verdict})


def add_model(db: Any, tenant: Any, **manifest: Any) -> uuid.UUID:
    return add_model_row(
        db,
        tenant.id,
        name='digits "convnet": v1',  # needs quoting in YAML
        manifest={"input_shape": [1, 8, 8], "config": CONFIG, **manifest},
    )


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    front, _, body = card[4:].partition("\n---\n")
    assert body.startswith("\n# ")
    loaded = yaml.safe_load(front)
    assert isinstance(loaded, dict)
    return loaded


def test_a_card_without_audits_parses(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("hub")
    model_id = add_model(clean_db, tenant)
    response = client.get(f"/v1/models/{model_id}/card", headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    meta = front_matter(response.text)
    assert meta["license"] == "other"
    assert meta["tags"] == ["bulwark", "clean-label-poisoning-audit", "convnet", "undefended"]
    assert meta["datasets"] == ["digits"]
    assert meta.get("model-index", []) == []
    assert "Not audited yet" in response.text and "Training recipe" in response.text
    schema = client.get("/openapi.json").json()
    declared = schema["paths"]["/v1/models/{model_id}/card"]["get"]["responses"]["200"]
    assert list(declared["content"]) == ["text/markdown"]


def test_a_card_carries_the_reports_numbers(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("hub")
    model_id = add_model(clean_db, tenant, license="apache-2.0")
    report = audit_report(model_id)
    assert report.verdict is not None and report.verdict.outcome == "fail"
    job = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={"model_id": str(model_id), "dataset": "digits"},
    )
    assert job.status_code == 202, job.text
    with Session(clean_db) as session:
        session.add(
            Report(
                tenant_id=tenant.id,
                job_id=uuid.UUID(job.json()["id"]),
                model_id=model_id,
                body=report.model_dump(mode="json"),
            )
        )
        session.commit()

    card = client.get(f"/v1/models/{model_id}/card", headers=tenant.headers).text
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"
    (entry,) = meta["model-index"]
    assert entry["name"] == 'digits "convnet": v1'
    (result,) = entry["results"]
    assert result["task"] == {"type": "image-classification", "name": "clean-label poisoning audit"}
    assert result["dataset"] == {"name": "digits", "type": "digits"}
    metrics = {m["name"]: m for m in result["metrics"]}
    for name, attack_result in report.attacks.items():
        asr = metrics[f"{name.upper()} ASR"]
        assert asr["type"] == "attack-success-rate"
        assert asr["value"] == round(100 * attack_result.asr, 1)
        baseline = metrics[f"{name.upper()} baseline (unperturbed bases)"]
        assert baseline["value"] == round(100 * attack_result.baseline.rate, 1)
        assert metrics[f"{name.upper()} Re. Acc"]["value"] == 90.34
    assert (metrics["FC ASR"]["value"], metrics["BP ASR"]["value"]) == (16.7, 66.7)
    assert metrics["Pre. Acc"]["value"] == 95.12
    assert metrics["Policy verdict"]["value"] == "fail"

    # The body: protocol, the one ASR table, the verdict, and the caveat on absolute ASR.
    assert "| FC |" in card and "| BP |" in card
    assert "1 (1) -> 7 (7), 3 (3) -> 8 (8); 3 targets per pair" in card
    assert "40 iterations" in card and "(8.0/255)" in card
    assert "poisons per instance: FC 1, BP 5" in card
    assert "10 epochs, lr 0.1 (x0.1 after epochs [5, 8])" in card
    assert "Pre. Acc (clean test accuracy, measured): 95.12%" in card
    assert "separation 1.500 (Eq. 4a" in card
    assert "**Verdict: FAIL** (policy, confidence 95%" in card and report.verdict.reason in card
    # ... and the policy it was measured against.
    assert 'Policy: `{"confidence":0.95,"default":{"max_asr":0.2},"attacks":{}}`' in card
    assert "Absolute ASR depends on the protocol" in card


def store_report(
    db: Any, client: Any, tenant: Any, model_id: uuid.UUID, report: AuditReport
) -> None:
    """An audit job of the model and its report row, as the worker leaves them."""
    job = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={"model_id": str(model_id), "dataset": "digits"},
    )
    assert job.status_code == 202, job.text
    with Session(db) as session:
        session.add(
            Report(
                tenant_id=tenant.id,
                job_id=uuid.UUID(job.json()["id"]),
                model_id=model_id,
                body=report.model_dump(mode="json"),
            )
        )
        session.commit()


def test_a_card_states_the_reference_pairs_and_headline(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("hub")
    model_id = add_model(clean_db, tenant)
    report = full_report(path=str(model_id))
    assert report.reference is not None
    store_report(clean_db, client, tenant, model_id, report)

    card = client.get(f"/v1/models/{model_id}/card", headers=tenant.headers).text
    (entry,) = front_matter(card)["model-index"]
    metrics = {m["name"]: m for m in entry["results"][0]["metrics"]}
    for name in ("fc", "bp"):
        label = name.upper()
        comparison = report.comparison[name]
        # The headline (correctly classified targets), and over all instances beside it.
        assert metrics[f"{label} ASR"]["value"] == round(100 * comparison.model.rate, 1)
        assert metrics[f"{label} ASR over all instances"]["value"] == round(
            100 * report.attacks[name].asr, 1
        )
        reference = metrics[f"{label} reference ASR (undefended, same instances)"]
        assert reference == {
            "type": "attack-success-rate",
            "name": f"{label} reference ASR (undefended, same instances)",
            "value": round(100 * comparison.reference.rate, 1),
        }
        (difference,) = [m for m in metrics.values() if m["name"].startswith(f"{label} ASR minus")]
        assert difference["type"] == "attack-success-rate-difference"
        assert difference["value"] == round(100 * comparison.difference, 1)
    assert (metrics["FC ASR"]["value"], metrics["BP ASR"]["value"]) == (11.1, 27.8)
    assert metrics["BP reference ASR (undefended, same instances)"]["value"] == 59.5
    assert (
        metrics["BP ASR minus reference, percentage points (95% CI -50.2 to -8.9)"]["value"]
        == -31.7
    )
    assert metrics["FC baseline (unperturbed bases)"]["value"] == 0.0  # among correct targets

    # The body: the reference's facts replace the "no reference" caveat; the pairs, how they
    # were chosen, the targets left out of the headline and the reach.
    assert "This card carries no reference audit." not in card
    assert "Each audit below carries one: the undefended reference" in card
    assert (
        "reference: /v1/models/reference-convnet-fashion-mnist (convnet, defense none; "
        "pre-trained by Bulwark without a defense (auto)), Pre. Acc 87.12%" in card
    )
    assert (
        "pairs (target -> poison class): 6 (Shirt) -> 0 (T-shirt/top) (closest), "
        "4 (Coat) -> 2 (Pullover) (closest), 1 (Trouser) -> 3 (Dress) (random), "
        "9 (Ankle boot) -> 7 (Sneaker) (random)" in card
    )
    assert "pairs: 6 -> 0 (closest, confusion 0.21)" in card
    assert "| FC | Shirt -> T-shirt/top | closest | 30.0% (3/10) | 10.0% (1/10) |" in card
    assert "4 of 40 targets already misclassified by the clean model are excluded" in card
    assert "(lower bound) BP: 3 of 40 instances not reached" in card
    assert "| BP | 27.8% (10/36) (lower bound) | [15.8, 44.0] | 59.5% (22/37) |" in card
    assert "| delta | 4/255 | 5 | 2.8% (1/36) | 10.8% (4/37) | 0.0% |" in card


def test_a_card_without_a_reference_keeps_the_caveat_and_says_why(
    client, make_tenant, clean_db
) -> None:
    tenant = make_tenant("hub")
    model_id = add_model(clean_db, tenant)
    store_report(
        clean_db, client, tenant, model_id, full_report(path=str(model_id), reference=False)
    )
    card = client.get(f"/v1/models/{model_id}/card", headers=tenant.headers).text
    metrics = {m["name"] for m in front_matter(card)["model-index"][0]["results"][0]["metrics"]}
    assert "FC ASR" in metrics and not any("reference" in name for name in metrics)
    assert "Absolute ASR depends on the protocol" in card
    assert "This card carries no reference audit." in card
    assert "reference: none (the audit was asked for none)" in card
