"""/v1/policy: the tenant's audit policy, stored and versioned; the newest version is in
force (docs/policy.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api.deps import CurrentTenant, SessionDep
from api.errors import problem_responses
from api.schemas import MAX_INT32, MAX_OFFSET
from api.services import policies as policy_service
from api.services.policies import PolicyInForce, PolicyVersionPublic, PolicyVersionsPage
from catalog.policy import Policy

router = APIRouter(prefix="/v1/policy", tags=["policy"])


@router.put(
    "",
    status_code=status.HTTP_201_CREATED,
    operation_id="putPolicy",
    summary="Store a new version of the policy",
    responses={
        201: {
            "description": "The stored version",
            "headers": {
                "Location": {"description": "the version's URL", "schema": {"type": "string"}}
            },
        },
        **problem_responses(409),
    },
)
def put_policy(
    policy: Policy, response: Response, session: SessionDep, tenant: CurrentTenant
) -> PolicyVersionPublic:
    """Store a new version of the tenant's policy (1, 2, ...); it is in force from now on,
    for every audit that finishes after it. An invalid policy is one 422 naming every bad
    field. Older versions stay readable under ``/v1/policy/versions``."""
    row = policy_service.store_policy(session=session, tenant=tenant, policy=policy)
    response.headers["Location"] = f"/v1/policy/versions/{row.version}"
    return policy_service.version_public(row)


@router.get("", operation_id="getPolicy", summary="Read the policy in force")
def get_policy(session: SessionDep, tenant: CurrentTenant) -> PolicyInForce:
    """The policy in force: the newest stored version, or Bulwark's default policy
    (``version`` null, ``default`` true) while the tenant has stored none."""
    return policy_service.policy_in_force(session=session, tenant=tenant)


@router.get("/versions", operation_id="listPolicyVersions", summary="List the policy's versions")
def list_policy_versions(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> PolicyVersionsPage:
    """Every stored version, newest first."""
    rows, total = policy_service.list_versions(
        session=session, tenant=tenant, limit=limit, offset=offset
    )
    return PolicyVersionsPage(
        items=[policy_service.version_public(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/versions/{version}", operation_id="getPolicyVersion", summary="Read a policy version")
def get_policy_version(
    version: Annotated[int, Path(ge=1, le=MAX_INT32)], session: SessionDep, tenant: CurrentTenant
) -> PolicyVersionPublic:
    return policy_service.version_public(
        policy_service.get_version(session=session, tenant=tenant, version=version)
    )
