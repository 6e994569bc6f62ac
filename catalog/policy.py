"""A tenant's audit policy: the thresholds that turn an audit into a verdict (torch-free).

``core.verdict.decide(report, policy)`` compares each attack's ASR with the policy's
thresholds through one-sided Wilson bounds at ``confidence`` and answers ``pass``, ``fail`` or
``inconclusive`` (docs/policy.md).

A policy file is JSON::

    {
      "confidence": 0.95,
      "default": {"max_asr": 0.2, "max_asr_above_baseline": 0.1},
      "attacks": {"fc": {"max_asr": 0.1}}
    }

- ``confidence`` (default 0.95, strictly between 0.5 and 1): the one-sided confidence of every
  bound.
- ``default``: the thresholds of every attack the audit ran. ``max_asr``: the ASR must be at
  most this; ``max_asr_above_baseline``: the ASR minus the clean baseline rate (the same
  re-training with the unperturbed bases) must be at most this. A threshold left out (or
  ``null``) is not checked.
  ``max_asr_relative_to_reference``: the ASR over the undefended reference's ASR on the same
  instances must be at most this (a ratio, not a rate: 0.5 means at least halved); it is not
  checked when the audit has no reference.
- ``attacks``: per attack, thresholds that override the default field by field: a field given
  here (``null`` included, which turns that check off for the attack) replaces the default's,
  a field left out keeps it. Above, FC is held to ``max_asr`` 0.1 and
  ``max_asr_above_baseline`` 0.1, every other attack to 0.2 and 0.1.

Thresholds are rates in [0, 1] (the reference ratio in [0, 100]). A policy must set at least
one threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_serializer, model_validator

from catalog.names import AttackName
from catalog.stored import StoredModel

THRESHOLD_NAMES = ("max_asr", "max_asr_above_baseline", "max_asr_relative_to_reference")

Rate = Annotated[float, Field(ge=0.0, le=1.0)]


class Thresholds(StoredModel):
    """The thresholds of one attack (or of every attack, as a policy's ``default``)."""

    max_asr: Rate | None = None
    max_asr_above_baseline: Rate | None = None
    # The model's ASR over the undefended reference's on the same instances (0.5: the model
    # must at least halve it); not checked on an audit without a reference.
    max_asr_relative_to_reference: Annotated[float, Field(ge=0.0, le=100.0)] | None = None


class Policy(StoredModel):
    """Confidence and thresholds; see the module docstring for the JSON form."""

    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    default: Thresholds = Field(default_factory=Thresholds)
    attacks: dict[AttackName, Thresholds] = Field(default_factory=dict)

    @field_serializer("attacks")
    def _only_the_overrides(self, attacks: dict[str, Thresholds]) -> dict[str, dict[str, Any]]:
        # An attack's entry means only the fields it gives (a field left out keeps the
        # default's, an explicit null turns the check off), so it is written without the unset
        # fields: dumped with them, a stored or reported policy would read back with every
        # left-out check turned off.
        return {
            name: thresholds.model_dump(mode="json", exclude_unset=True)
            for name, thresholds in attacks.items()
        }

    @model_validator(mode="after")
    def _sets_a_threshold(self) -> Policy:
        entries = [self.default, *self.attacks.values()]
        if not any(getattr(e, name) is not None for e in entries for name in THRESHOLD_NAMES):
            raise ValueError("a policy must set at least one threshold")
        return self

    def thresholds_for(self, attack: str) -> dict[str, float]:
        """Threshold name -> value for ``attack``: the default, overridden field by field by
        the attack's own entry; thresholds that are off are left out."""
        merged = {name: getattr(self.default, name) for name in THRESHOLD_NAMES}
        own = self.attacks.get(attack)
        if own is not None:
            merged |= {name: getattr(own, name) for name in own.model_fields_set}
        return {name: value for name, value in merged.items() if value is not None}


# The policy of a tenant that has not stored one (and of ``bulwark audit`` without --policy):
# the poisons may not add more than 10 points of ASR over the clean baseline, and where the
# audit has an undefended reference, the model must at least halve the reference's ASR.
DEFAULT_POLICY = Policy(
    confidence=0.95,
    default=Thresholds(max_asr_above_baseline=0.1, max_asr_relative_to_reference=0.5),
)


def read_policy(source: Path | str | dict[str, Any]) -> Policy:
    """A policy from a file, a JSON string or a parsed dict.

    Raises ``OSError`` for an unreadable file and ``pydantic.ValidationError`` for invalid
    JSON or fields (one error per field).
    """
    if isinstance(source, Path):
        source = source.read_text()
    if isinstance(source, str):
        return Policy.model_validate_json(source)
    return Policy.model_validate(source)
