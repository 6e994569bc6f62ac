"""Sequential audits: crafting in rounds that stop once the verdict is decided, and the early
stop of instances whose poisons already succeed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from catalog.policy import Policy, Thresholds
from core.attacks import EarlyStop, attack_class
from core.attacks.base import AttackContext
from core.audit import Instance, crafting_model, instance_rounds, run_audit
from core.checkpoint import save_extractor
from core.config import audit_config
from core.verdict import decide


@pytest.fixture(scope="module")
def undefended(digits_extractor, tmp_path_factory) -> Path:
    loaded = digits_extractor("none")
    out = tmp_path_factory.mktemp("sequential-none")
    save_extractor(out, loaded.model, loaded.manifest)
    return out


def _config(model: Path, **overrides):
    values = {
        "model": str(model),
        "dataset": "digits",
        "attacks": ("fc", "bp"),
        "attack_settings": {"bp": {"poisons": 2}},
        "pairs": ((8, 1), (3, 1), (9, 4)),
        "targets_per_pair": 4,
        "iterations": 30,
        "retrain_epochs": 10,
        "screen_images": 0,
        "delta": 0.2,
        **overrides,
    }
    return audit_config(**values)


def test_rounds_cover_every_pair_and_every_instance_once():
    instances = [
        Instance(target_index=i, target_class=pair[0], poison_class=pair[1], base_indices=(i,))
        for pair in ((0, 1), (2, 3), (4, 5))
        for i in range(5)
    ]
    groups = instance_rounds(instances, 2)
    assert sorted(i for group in groups for i in group) == list(range(15))
    for group in groups:
        assert {(instances[i].target_class, instances[i].poison_class) for i in group} == {
            (0, 1),
            (2, 3),
            (4, 5),
        }
    assert [len(group) for group in groups] == [9, 6]  # 3 + 2 targets of each pair
    assert instance_rounds(instances, 10) == [
        [0, 5, 10],
        [1, 6, 11],
        [2, 7, 12],
        [3, 8, 13],
        [4, 9, 14],
    ]


@pytest.mark.parametrize("attack", ["fc", "bp"])
def test_an_instance_stopped_early_keeps_the_poisons_it_had(attack, digits_extractor):
    """Instance 0 stops at the first check after 5 iterations: its poisons are those of a
    5-iteration run; the others run on, exactly as without the early stop."""
    model = digits_extractor("none").model
    attacker, _ = crafting_model(model, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    bases = torch.rand(3, 2, 1, 8, 8, generator=generator)
    targets = torch.rand(3, 1, 8, 8, generator=generator)
    context = AttackContext(targets=targets, bases=bases)
    implementation = attack_class(attack)

    def make(iterations: int):
        return implementation(delta=0.1, iterations=iterations, batch_size=None)

    calls = []

    def first_succeeds(indices: torch.Tensor, poisons: torch.Tensor) -> torch.Tensor:
        calls.append(indices.tolist())
        return indices == 0

    stopped = make(12)(attacker, context, early_stop=EarlyStop(5, first_succeeds))
    short = make(5)(attacker, context)
    full = make(12)(attacker, context)
    k = stopped.poisons.shape[1]
    assert calls == [[0, 1, 2], [1, 2]]  # after 5 and 10 iterations
    torch.testing.assert_close(stopped.poisons[0], short.poisons[0])
    torch.testing.assert_close(stopped.poisons[1:], full.poisons[1:])
    # Work counts every forward pass of a poison: FC's evaluation before its first step and
    # after each of the 12; BP's 12 steps and its final scoring pass. Stopped after 5 steps,
    # instance 0 skips FC's last 7 evaluations and BP's last 7 steps and its scoring pass.
    assert full.work == 3 * k * 13
    assert stopped.work == full.work - k * {"fc": 7, "bp": 8}[attack]


def test_a_decided_look_stops_the_audit_and_agrees_with_the_final_verdict(undefended):
    """A policy every result meets decides at the first look: one round of four is crafted,
    and the verdict on the report (at the policy's own confidence) is the same."""
    easy = Policy(default=Thresholds(max_asr=1.0))
    config = _config(undefended, sequential=True, rounds=4)
    report = run_audit(config, policy=easy)
    facts = report.sequential
    assert facts is not None and facts.rounds_run == 1 and facts.rounds_planned == 4
    assert facts.instances_run == 3 == len(report.instances)  # one target of each pair
    assert facts.look_confidence == pytest.approx(1 - 0.05 / 4)
    assert facts.stopped.startswith("pass decided after round 1 of 4")
    assert decide(report, easy).outcome == "pass"
    assert facts.crafting_work < facts.crafting_work_full / 3
    assert sum(r.instances for r in report.attacks.values()) == 2 * 3


def test_an_undecided_sequential_audit_runs_every_round_like_the_full_one(undefended):
    """No look can decide a threshold no result can cross: all rounds run, and instance by
    instance the results are those of the full audit (each instance is crafted alone)."""
    never = Policy(confidence=0.99, default=Thresholds(max_asr=0.5))
    full = run_audit(_config(undefended))
    sequential = run_audit(
        _config(undefended, sequential=True, rounds=4, stop_for_futility=False), policy=never
    )
    assert sequential.sequential.rounds_run == 4
    assert sequential.sequential.instances_run == len(full.instances) == 12
    for name, result in full.attacks.items():
        theirs = sequential.attacks[name]
        mine = {r.target_index: r.success for r in result.rows}
        assert {r.target_index: r.success for r in theirs.rows} == mine
        assert theirs.crafting_work == result.crafting_work
    assert sequential.sequential.crafting_work == sum(
        r.crafting_work for r in sequential.attacks.values()
    )


def test_a_look_that_cannot_decide_by_the_planned_end_stops_for_futility(undefended):
    """12 planned instances cannot bound an ASR away from 50% at 99.75% per look, whatever
    the first round's rates: the audit stops after it, inconclusive, with a quarter of the
    work, and the report's verdict (at the look's confidence) says the same."""
    never = Policy(confidence=0.99, default=Thresholds(max_asr=0.5))
    report = run_audit(_config(undefended, sequential=True, rounds=4), policy=never)
    facts = report.sequential
    assert facts is not None and facts.rounds_run == 1 and facts.instances_run == 3
    assert "stopped for futility" in facts.stopped and facts.stopped.startswith("inconclusive")
    assert facts.crafting_work <= facts.crafting_work_full / 4
    verdict = decide(report, never)
    assert verdict.outcome == "inconclusive"
    assert verdict.confidence == pytest.approx(facts.look_confidence) == pytest.approx(0.9975)


def test_early_stop_saves_work_where_instances_succeed(undefended):
    plain = run_audit(_config(undefended, attacks=("bp",)))
    early = run_audit(_config(undefended, attacks=("bp",), early_stop_every=5))
    won = plain.attacks["bp"].successes
    assert won > 0, "the digits set-up should let BP win some instances at delta 0.2"
    assert early.attacks["bp"].crafting_work < plain.attacks["bp"].crafting_work
    # An attacker who stops once the poisons work wins at least as often.
    assert early.attacks["bp"].successes >= won - 1


@pytest.mark.slow  # a CLI subprocess or a whole audit: out of make test-fast
def test_an_interrupted_audit_resumes_from_its_last_finished_attack(
    undefended, tmp_path, monkeypatch
):
    """A worker that dies mid-audit: the rerun with the same state folder crafts only what
    was not finished, and the report equals an uninterrupted run's."""
    import core.audit

    config = _config(undefended, attacks=("fc", "bp"), reference=str(undefended))
    uninterrupted = run_audit(config)

    crafted: list[str] = []
    real = core.audit.craft_stage

    def counting(inputs, features, attack, *args, **kwargs):
        crafted.append(attack)
        return real(inputs, features, attack, *args, **kwargs)

    monkeypatch.setattr(core.audit, "craft_stage", counting)

    class WorkerDiedError(Exception):
        pass

    def die_in_bp(update):
        if update.phase == "craft:bp" and (update.step or 0) >= 5:
            raise WorkerDiedError

    state = tmp_path / "state"
    with pytest.raises(WorkerDiedError):
        run_audit(config, progress=die_in_bp, state_dir=state)
    assert crafted == ["fc", "bp"]
    crafted.clear()
    resumed = run_audit(config, state_dir=state)
    # FC was kept; BP (interrupted) and the reference's attacks are crafted now.
    assert crafted == ["bp", "fc", "bp"]
    for name in ("fc", "bp"):
        assert resumed.attacks[name].rows == uninterrupted.attacks[name].rows
        assert resumed.reference.attacks[name].rows == uninterrupted.reference.attacks[name].rows
    # Another config starts afresh.
    crafted.clear()
    other = _config(undefended, attacks=("fc",), attack_settings={}, reference=str(undefended))
    run_audit(other, state_dir=state)
    assert crafted == ["fc", "fc"]


@pytest.mark.slow  # a CLI subprocess or a whole audit: out of make test-fast
def test_an_audit_fans_out_into_parts_that_any_worker_crafts(undefended, tmp_path):
    """Each part (an attack, on the model or on the reference) crafted in its own folder, as
    on separate workers; the scoring run over their union crafts nothing and reports what the
    audit in one piece reports."""
    from core.audit import audit_parts, craft_audit_parts

    config = _config(undefended, reference=str(undefended))
    parts = audit_parts(config)
    assert parts == [
        "model-fc-round0",
        "model-bp-round0",
        "reference-fc-round0",
        "reference-bp-round0",
    ]
    whole = run_audit(config)
    merged = tmp_path / "merged"
    for index, part in enumerate(parts):
        own = tmp_path / f"worker{index}"
        craft_audit_parts(config, [part], state_dir=own)
        files = sorted(p.name for p in own.iterdir())
        assert files == ["config.json", f"{part}.pt"]
        merged.mkdir(exist_ok=True)
        (merged / f"{part}.pt").write_bytes((own / f"{part}.pt").read_bytes())
        (merged / "config.json").write_bytes((own / "config.json").read_bytes())

    import core.audit

    real = core.audit.craft_stage
    core.audit.craft_stage = lambda *a, **k: pytest.fail("the scoring run crafted")
    try:
        scored = run_audit(config, state_dir=merged)
    finally:
        core.audit.craft_stage = real
    for name in ("fc", "bp"):
        assert scored.attacks[name].rows == whole.attacks[name].rows
        assert scored.reference.attacks[name].rows == whole.reference.attacks[name].rows
    assert scored.union == whole.union
    with pytest.raises(core.audit.AuditError, match="unknown audit parts"):
        craft_audit_parts(config, ["model-gm-round0"], state_dir=tmp_path / "x")
