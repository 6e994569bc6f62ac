"""Abuse limits: per-tenant request rates, failed-authentication throttling, quotas, job sizes.

- **Rate** (``BULWARK_RATE_LIMIT_PER_SECOND``, ``BULWARK_RATE_LIMIT_BURST``): a token bucket per
  tenant. In Redis when the broker is Redis (one bucket for every API process), else in the
  API process (the embedded SQLite deployment runs one). Over it: 429 with ``Retry-After``.
- **Failed authentication** (``BULWARK_AUTH_FAILURE_LIMIT`` per
  ``BULWARK_AUTH_FAILURE_WINDOW_SECONDS``): a client IP that sent that many wrong keys gets 429
  on every request until its window ends, whatever key it sends then, so that guessing keys
  stops there. A missing key is not a guess and does not count.
- **Quotas**: queued + running jobs per tenant (``BULWARK_MAX_ACTIVE_JOBS``: 429 with
  ``Retry-After``, it passes once a job finishes) and stored bytes of models and datasets
  (``BULWARK_MAX_STORED_BYTES``: 413, it passes only once something is deleted).
- **Job sizes**: an audit's iterations x targets x poisons x draws
  (``BULWARK_MAX_AUDIT_WORK``) and a pre-training's epochs x images
  (``BULWARK_MAX_PRETRAIN_WORK``): 422 naming the field that is furthest above its default.

Each limit set to 0 is off. Redis trouble never fails a request: the limiter falls back to its
in-process buckets until Redis answers again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import InvalidFieldError, ServiceError, UploadTooLargeError
from catalog import DATASETS
from common.models import Job, JobStatus, StoredModel, Tenant, TenantDataset
from common.settings import Settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "bulwark:limits:"
# A client that hits the job quota should come back when a job may have finished.
ACTIVE_JOBS_RETRY_AFTER_SECONDS = 30
# In-process tables are bounded: the least recently seen tenants and IPs are dropped first.
MAX_TRACKED = 100_000
# After a Redis error, the in-process buckets stand in this long before Redis is tried again.
REDIS_RETRY_SECONDS = 5.0


class TooManyRequestsError(ServiceError):
    """429: slow down; ``Retry-After`` says when the next request can pass."""

    status_code = 429
    slug = "too-many-requests"
    title = "Too many requests"

    def __init__(self, message: str, *, retry_after: float, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimitedError(TooManyRequestsError):
    slug = "rate-limited"
    title = "Rate limit exceeded"


class AuthThrottledError(TooManyRequestsError):
    slug = "authentication-throttled"
    title = "Too many failed authentications"


class ActiveJobsQuotaError(TooManyRequestsError):
    slug = "quota-exceeded"
    title = "Quota exceeded"


class StorageQuotaError(UploadTooLargeError):
    """413: the upload does not fit in what is left of the tenant's storage quota."""

    slug = "storage-quota-exceeded"
    title = "Storage quota exceeded"


class Buckets(Protocol):
    def take(self, key: str, rate: float, burst: int) -> float:
        """Take one token of ``key``'s bucket: 0 if there was one, else seconds until one."""

    def failures(self, key: str) -> tuple[int, float]:
        """Failures counted in ``key``'s current window, and seconds until it ends."""

    def admit(
        self, failure_key: str, limit: int, bucket_key: str, rate: float, burst: int
    ) -> tuple[int, float, float]:
        """``failures(failure_key)`` and then, unless they reach ``limit`` (0: no limit) or
        ``rate`` is 0, ``take(bucket_key, ...)``: the failures, the seconds until their
        window ends, and the wait (0 where no token was taken)."""

    def add_failure(self, key: str, window: float) -> None: ...


class MemoryBuckets:
    """Buckets and failure windows in this process, for a deployment without Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._windows: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def take(self, key: str, rate: float, burst: int) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / rate
            self._buckets[key] = (tokens, now)
            _bound(self._buckets)
            return wait

    def admit(
        self, failure_key: str, limit: int, bucket_key: str, rate: float, burst: int
    ) -> tuple[int, float, float]:
        count, remaining = self.failures(failure_key)
        throttled = 0 < limit <= count
        return (
            count,
            remaining,
            self.take(bucket_key, rate, burst) if rate > 0 and not throttled else 0.0,
        )

    def failures(self, key: str) -> tuple[int, float]:
        now = time.monotonic()
        with self._lock:
            count, ends = self._windows.get(key, (0, now))
            if ends <= now:
                self._windows.pop(key, None)
                return 0, 0.0
            return count, ends - now

    def add_failure(self, key: str, window: float) -> None:
        now = time.monotonic()
        with self._lock:
            count, ends = self._windows.pop(key, (0, now + window))
            if ends <= now:
                count, ends = 0, now + window
            self._windows[key] = (count + 1, ends)
            _bound(self._windows)


def _bound(table: OrderedDict[str, Any]) -> None:
    while len(table) > MAX_TRACKED:
        table.popitem(last=False)


# One atomic step of a token bucket stored as a Redis hash (tokens, time in ms); the time is
# Redis's own, so every API process agrees. Returns the wait in seconds, as a string (Lua
# numbers come back to the client truncated to integers).
TAKE_FUNCTION = """
local function take(key, rate, burst)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local state = redis.call('HMGET', key, 'tokens', 'ms')
  local tokens = tonumber(state[1]) or burst
  local last = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
  local wait = 0
  if tokens >= 1 then
    tokens = tokens - 1
  else
    wait = (1 - tokens) / rate
  end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ms', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
  return tostring(wait)
end
"""
TAKE_SCRIPT = TAKE_FUNCTION + "return take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"
# A known key's whole admission in one round trip (the status poll's): the client's failure
# count and its window's milliseconds left, then, with a rate and unless the client is
# throttled (a throttled request takes no token, as on the path with a lookup), one token of
# the tenant's bucket. ARGV: the failure limit (0: none), the rate, the burst.
ADMIT_SCRIPT = (
    TAKE_FUNCTION
    + """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttl = redis.call('PTTL', KEYS[1])
local limit = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local wait = '0'
if rate > 0 and (limit <= 0 or count < limit) then
  wait = take(KEYS[2], rate, tonumber(ARGV[3]))
end
return {count, ttl, wait}
"""
)


class RedisBuckets:
    """The same buckets in Redis, shared by every API process."""

    def __init__(self, url: str) -> None:
        import redis

        # Short timeouts: a limiter that waits on a sick Redis would be the outage.
        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._take = self._client.register_script(TAKE_SCRIPT)
        self._admit = self._client.register_script(ADMIT_SCRIPT)

    def take(self, key: str, rate: float, burst: int) -> float:
        return float(self._take(keys=[key], args=[rate, burst]))

    def failures(self, key: str) -> tuple[int, float]:
        # One round trip without MULTI/EXEC: a window that ends between the two reads has
        # a ttl of -2, which reads as no failures, as it would an instant later.
        pipe = self._client.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        return _window(*pipe.execute())

    def admit(
        self, failure_key: str, limit: int, bucket_key: str, rate: float, burst: int
    ) -> tuple[int, float, float]:
        count, ttl, wait = self._admit(keys=[failure_key, bucket_key], args=[limit, rate, burst])
        return (*_window(count, ttl), float(wait))

    def add_failure(self, key: str, window: float) -> None:
        pipe = self._client.pipeline()
        pipe.incr(key)
        pipe.pexpire(key, math.ceil(window * 1000), nx=True)  # the window starts at the first
        pipe.execute()


def _window(count: Any, ttl: Any) -> tuple[int, float]:
    """Redis's failure count and its key's ttl in ms as (failures, seconds left)."""
    if count is None or ttl is None or int(ttl) <= 0:
        return 0, 0.0
    return int(count), int(ttl) / 1000


class Limiter:
    """The request-rate and failed-authentication checks of ``api.deps.current_tenant``."""

    def __init__(self, settings: Settings, redis_url: str | None = None) -> None:
        self.settings = settings
        self._memory = MemoryBuckets()
        self._redis: RedisBuckets | None = RedisBuckets(redis_url) if redis_url else None
        self._redis_down_until = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limiter:
        url = settings.broker_url or ""
        return cls(settings, url if url.startswith(("redis://", "rediss://")) else None)

    def _call(self, method: str, *args: Any) -> Any:
        """``method`` on Redis, or on the in-process buckets while Redis is unreachable."""
        if self._redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                return getattr(self._redis, method)(*args)
            except Exception as error:  # redis raises many connection error types
                self._redis_down_until = time.monotonic() + REDIS_RETRY_SECONDS
                logger.warning(
                    "rate limits in-process for %s s: Redis: %s", REDIS_RETRY_SECONDS, error
                )
        return getattr(self._memory, method)(*args)

    def check_rate(self, tenant: Tenant) -> None:
        rate, burst = self._rate()
        if rate > 0:
            self._raise_over_rate(float(self._call("take", self._bucket_key(tenant), rate, burst)))

    def check_client(self, client: str) -> None:
        """429 while ``client`` (an IP) is throttled for failed authentications."""
        if self.settings.auth_failure_limit > 0:
            self._raise_throttled(*self._call("failures", self._failure_key(client)))

    def admit(self, client: str, tenant: Tenant) -> None:
        """:meth:`check_client` then :meth:`check_rate` in one step (one Redis round trip), for
        a request whose key is known without a lookup (the status poll's cached key)."""
        rate, burst = self._rate()
        limit = max(0, self.settings.auth_failure_limit)
        if limit == 0 and rate <= 0:
            return
        count, remaining, wait = self._call(
            "admit", self._failure_key(client), limit, self._bucket_key(tenant), rate, burst
        )
        if limit > 0:
            self._raise_throttled(count, remaining)
        self._raise_over_rate(wait)

    def _rate(self) -> tuple[float, int]:
        """The rate and burst of the tenants' buckets; a rate of 0 when either is off."""
        rate, burst = self.settings.rate_limit_per_second, self.settings.rate_limit_burst
        return (rate, burst) if rate > 0 and burst > 0 else (0.0, burst)

    @staticmethod
    def _bucket_key(tenant: Tenant) -> str:
        return f"{KEY_PREFIX}rate:{tenant.id}"

    @staticmethod
    def _failure_key(client: str) -> str:
        return f"{KEY_PREFIX}authfail:{client}"

    def _raise_over_rate(self, wait: float) -> None:
        if wait > 0:
            rate, burst = self._rate()
            raise RateLimitedError(
                f"more than {burst} requests at once or {rate:g} per second for this tenant; "
                f"retry after {max(1, math.ceil(wait))} s",
                retry_after=wait,
                limit_per_second=rate,
                burst=burst,
            )

    def _raise_throttled(self, count: int, remaining: float) -> None:
        if count >= self.settings.auth_failure_limit:
            raise AuthThrottledError(
                f"{count} requests with a wrong API key from this address; retry after "
                f"{max(1, math.ceil(remaining))} s",
                retry_after=remaining,
            )

    def record_failure(self, client: str) -> None:
        if self.settings.auth_failure_limit <= 0:
            return
        window = self.settings.auth_failure_window_seconds
        self._call("add_failure", self._failure_key(client), window)


def check_active_jobs(session: Session, settings: Settings, tenant: Tenant) -> None:
    """429 when the tenant already has ``max_active_jobs`` queued or running jobs.

    The tenant's row is locked first (Postgres), so two submissions at the same moment are
    counted one after the other; the lock ends with the transaction that adds the job."""
    limit = settings.max_active_jobs
    if limit <= 0:
        return
    # No autoflush: a dataset upload has added its row, whose job is not inserted yet.
    with session.no_autoflush:
        session.get(Tenant, tenant.id, with_for_update=True)
        active = _active_jobs(session, tenant)
    if active >= limit:
        session.rollback()
        raise ActiveJobsQuotaError(
            f"{active} of your jobs are queued or running, the quota is {limit}; submit again "
            "once one finished (or cancel one)",
            retry_after=ACTIVE_JOBS_RETRY_AFTER_SECONDS,
            quota="max_active_jobs",
            limit=limit,
            used=active,
        )


def _active_jobs(session: Session, tenant: Tenant) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.tenant_id == tenant.id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                Job.deleted_at.is_(None),
                Job.parent_id.is_(None),  # an audit's parts are the audit's, not new jobs
            )
        )
        or 0
    )


def stored_bytes(session: Session, tenant: Tenant) -> int:
    """Bytes of the tenant's models and datasets that are not deleted."""
    models = session.scalar(
        select(func.coalesce(func.sum(StoredModel.size_bytes), 0)).where(
            StoredModel.tenant_id == tenant.id, StoredModel.deleted_at.is_(None)
        )
    )
    datasets = session.scalar(
        select(func.coalesce(func.sum(TenantDataset.size_bytes), 0)).where(
            TenantDataset.tenant_id == tenant.id, TenantDataset.deleted_at.is_(None)
        )
    )
    return int(models or 0) + int(datasets or 0)


def check_stored_bytes(session: Session, settings: Settings, tenant: Tenant, adding: int) -> None:
    """413 when ``adding`` bytes more would take the tenant past ``max_stored_bytes``."""
    limit = settings.max_stored_bytes
    if limit <= 0:
        return
    used = stored_bytes(session, tenant)
    if used + adding > limit:
        raise StorageQuotaError(
            f"this upload ({adding} bytes) does not fit: your models and datasets take {used} "
            f"of your {limit}-byte quota; delete some (DELETE /v1/models/{{id}}, "
            "DELETE /v1/datasets/{id}) first",
            quota="max_stored_bytes",
            limit=limit,
            used=used,
            requested=adding,
        )


def _too_big(
    what: str, limit: int, setting: str, factors: list[tuple[tuple[str | int, ...], str, int, int]]
) -> InvalidFieldError:
    """A 422 on the factor furthest above its default (``factors``: loc, name, value,
    default), with the whole product in the message."""
    total = math.prod(value for _, _, value, _ in factors)
    loc, _, _, _ = max(factors, key=lambda factor: factor[2] / max(1, factor[3]))
    product = " x ".join(f"{name} {value}" for _, name, value, _ in factors)
    return InvalidFieldError.at(
        ("body", *loc),
        f"{what} too big: {product} = {total}, above this deployment's limit of {limit} "
        f"({setting}); make {'.'.join(map(str, loc))} smaller",
    )


def audit_pairs(config: Any) -> int:
    """An upper bound on the audit's class pairs: the explicit ones plus what each pair set
    adds (the worker resolves the sets; ``core.audit.choose_pairs``)."""
    adds = {"closest": config.closest_pairs, "random": config.random_pairs, "paper": 1}
    return len(config.pairs) + sum(adds.get(name, 1) for name in config.pair_sets or ())


def check_audit_size(settings: Settings, config: Any) -> None:
    """422 when iterations x targets x poisons x draws is above ``max_audit_work``: the
    poison forward-backward passes of crafting (multi-draw crafting takes ``draws`` each)."""
    limit = settings.max_audit_work
    if limit <= 0:
        return
    targets = config.targets_per_pair * max(1, audit_pairs(config))
    factors: list[tuple[tuple[str | int, ...], str, int, int]] = [
        (("iterations",), "iterations", config.iterations, 500),
        (("targets_per_pair",), "targets", targets, 50),
        (("attack_settings",), "poisons", config.max_poisons, 5),
        (("overrides", "draws"), "draws", config.draws, 1),
    ]
    if math.prod(value for _, _, value, _ in factors) > limit:
        raise _too_big("the audit is", limit, "BULWARK_MAX_AUDIT_WORK", factors)


def check_pretrain_size(
    settings: Settings, config: Any, dataset: TenantDataset | None = None
) -> None:
    """422 when epochs x images is above ``max_pretrain_work``; images is the split's
    pre-training images per class times the classes."""
    limit = settings.max_pretrain_work
    if limit <= 0:
        return
    split = config.resolved_split
    if dataset is not None:
        classes = len(dataset.classes or ()) or 1
    else:
        classes = DATASETS.get(config.dataset).num_classes or 1
    images = split.pretrain * classes
    factors: list[tuple[tuple[str | int, ...], str, int, int]] = [
        (("epochs",), "epochs", config.epochs, 120),
        (("overrides", "split"), "images", images, 48_000),
    ]
    if math.prod(value for _, _, value, _ in factors) > limit:
        raise _too_big("the pre-training is", limit, "BULWARK_MAX_PRETRAIN_WORK", factors)
