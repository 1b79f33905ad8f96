"""Admission decisions from a request's predicted carbon: per-request cap (refuse, or lower
``max_tokens``), grid-aware deferral, tenant budgets, and the request's priority.

Independent of vLLM (``hooks/admission.py`` feeds it). One :meth:`AdmissionController.decide`
per engine request (each sequence of ``n`` > 1 or of a multi-prompt completion is one), in this
order, the first that refuses wins:

1. no prediction (the predictor failed or there is none): admitted when ``fail_open`` (counted
   as ``no_prediction``), else refused with 503;
2. request cap on the upper bound at ``max_tokens`` or on the expected value; over it the request
   is refused (429) or, with ``action = "lower_max_tokens"``, admitted with the largest
   ``max_tokens`` whose prediction fits (refused when even one token does not);
3. deferral: a request that says it can wait (header), while the grid's intensity is above the
   threshold and a cleaner hour comes within ``horizon_s``: 429 with ``Retry-After`` at that hour;
4. tenant budget: the upper bound is reserved in every window of the tenant's budget or the
   request is refused (429, ``Retry-After`` when the window has room again); the store failing
   admits (``store_error``) when ``fail_open``;
5. priority (only for admitted requests): from predicted carbon or the tenant's class.

``dry-run`` mode decides the same (and reserves: the request runs and spends) but admits every
request; the decision is then ``would_refuse`` / ``would_defer`` / ``would_lower``.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import AdmissionConfig, TenantBudget, Window
from .ledger import BudgetLedger, SharedBudgetLedger, StoreError, default_shared_path

logger = logging.getLogger(__name__)

__all__ = ["AdmissionController", "AdmissionRequest", "Decision", "IntensitySource", "Predicted",
           "StaticIntensity", "tenant_from_headers"]

ADMIT, REFUSE, DEFER, LOWER = "admit", "refuse", "defer", "lower"
WOULD = {REFUSE: "would_refuse", DEFER: "would_defer", LOWER: "would_lower"}


class IntensitySource(Protocol):
    """Grid carbon intensity (g CO2e/kWh) now, and the start of the next hour below a threshold."""

    def now_g_per_kwh(self, now_s: float) -> float: ...

    def next_below(self, threshold_g_per_kwh: float, now_s: float, horizon_s: float) -> float | None: ...


@dataclass(frozen=True)
class StaticIntensity:
    """One constant intensity (the plugin's ``LLMCO2_CARBON_INTENSITY_G_PER_KWH``): there is never
    a cleaner hour to wait for, so deferral never defers with it."""

    g_per_kwh: float

    def now_g_per_kwh(self, now_s: float) -> float:
        return self.g_per_kwh

    def next_below(self, threshold_g_per_kwh: float, now_s: float, horizon_s: float) -> float | None:
        return now_s if self.g_per_kwh <= threshold_g_per_kwh else None


@dataclass(frozen=True)
class Predicted:
    """The parts of a prediction admission uses (whole request share, this sequence)."""

    co2_g: float
    co2_g_upper: float
    energy_j: float
    energy_j_upper: float
    max_tokens: int


@dataclass
class AdmissionRequest:
    request_id: str
    tenant: str
    predicted: Predicted | None
    deferrable: bool = False
    client_priority: int = 0  # vLLM's default 0 cannot be told apart from a client's explicit 0
    # The prediction at another max_tokens (for lowering); None: lowering is not possible.
    what_if: Callable[[int], Predicted | None] | None = None
    # Sequences of the HTTP request this one belongs to (n > 1, multi-prompt completions), each
    # predicted with an equal share: the per-request cap applies to their sum.
    sequences: int = 1


@dataclass
class Decision:
    decision: str  # admit | refuse | defer | lower | would_refuse | would_defer | would_lower
    reason: str  # within_limits | request_cap | grid_intensity | tenant_budget | no_prediction | store_error | ...
    policy: str  # which rule decided: none, request_cap, deferral, budget:<tenant>:<window>s, ...
    tenant: str
    admitted: bool
    status: int = 200
    retry_after_s: float | None = None
    message: str = ""
    max_tokens: int | None = None  # lowered max_tokens (applied when admitted)
    priority: int | None = None  # vLLM priority to set (None: leave it)
    predicted_value: float | None = None
    limit: float | None = None
    unit: str = "g"
    reserved_g: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def error_body(self) -> dict[str, Any]:
        """The OpenAI-style JSON error (vLLM's ErrorResponse shape plus an ``llmco2`` object)."""
        import http

        info: dict[str, Any] = {"policy": self.policy, "reason": self.reason, "tenant": self.tenant,
                                "decision": self.decision}
        if self.predicted_value is not None:
            info["predicted"] = self.predicted_value
            info["limit"] = self.limit
            info["unit"] = self.unit
        if self.retry_after_s is not None:
            info["retry_after_s"] = self.retry_after_s
        info.update(self.details)
        return {"error": {"message": self.message, "type": http.HTTPStatus(self.status).phrase,
                          "param": "max_tokens" if self.reason == "request_cap" else None,
                          "code": self.status, "llmco2": info}}

    def span_attributes(self) -> dict[str, str | float | int | bool]:
        a: dict[str, str | float | int | bool] = {
            "llmco2.admission.decision": self.decision, "llmco2.admission.reason": self.reason,
            "llmco2.admission.policy": self.policy, "llmco2.admission.tenant": self.tenant}
        if self.max_tokens is not None and self.decision == LOWER:
            a["llmco2.admission.max_tokens"] = self.max_tokens
        if self.priority is not None:
            a["llmco2.admission.priority"] = self.priority
        if self.retry_after_s is not None:
            a["llmco2.admission.retry_after_s"] = self.retry_after_s
        return a


def tenant_from_headers(headers: Mapping[str, str], tenant_header: str) -> str:
    """The tenant of a request: the configured header (names kept when short and plain, hashed
    otherwise), else the API key of ``Authorization: Bearer`` hashed (``key:<sha256[:16]>``;
    the key itself is never stored), else ``default``. ``headers``: lower-case names."""
    v = headers.get(tenant_header)
    if v:
        v = v.strip()
        if 0 < len(v) <= 64 and all(c.isalnum() or c in "-_.:@" for c in v) and not v.startswith("key:"):
            return v
        return "h:" + hashlib.sha256(v.encode("utf-8", "replace")).hexdigest()[:16]
    auth = headers.get("authorization")
    if auth:
        key = auth.strip()
        if key.lower().startswith("bearer "):
            key = key[7:].strip()
        if key:
            return "key:" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:16]
    return "default"


def _scaled(p: Predicted | None, k: int) -> Predicted | None:
    if p is None or k == 1:
        return p
    return Predicted(p.co2_g * k, p.co2_g_upper * k, p.energy_j * k, p.energy_j_upper * k, p.max_tokens)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


class AdmissionController:
    """Decides (thread-safe). ``config`` may be replaced at any time by :meth:`reconfigure`.

    Args:
        config: the validated config.
        intensity: the grid intensity source for deferral (default: none, deferral admits).
        clock: wall clock (s since the epoch) for windows and Retry-After.
        on_decision: called with every :class:`Decision` (the hooks count it in Prometheus).
        processes: how many processes of this server decide on the same budgets (vLLM's
            ``--api-server-count``); above 1 the budgets use the :class:`SharedBudgetLedger`
            (exact across them) unless ``budgets.shared`` says otherwise.
    """

    def __init__(self, config: AdmissionConfig, *, intensity: IntensitySource | None = None,
                 clock: Callable[[], float] = time.time,
                 on_decision: Callable[[Decision], None] | None = None, processes: int = 1) -> None:
        self.config = config
        self.processes = max(1, int(processes))
        self.intensity = intensity
        self._clock = clock
        self.on_decision = on_decision
        self.counts: Counter[tuple[str, str]] = Counter()
        self._count_lock = threading.Lock()
        self.store_error: str | None = None
        self.failures: Counter[str] = Counter()  # predictor / store / intensity failures, by kind
        self.ledger: BudgetLedger | None = None
        self._ledger_path: str | None = None
        self._open_ledger(config)

    # ------------------------------------------------------------------ config
    def _windows_for(self, tenant: str) -> tuple[Window, ...]:
        b = self.config.budgets
        return b.budget_for(tenant).windows if b is not None else ()

    def _open_ledger(self, config: AdmissionConfig) -> None:
        b = config.budgets
        if b is None:
            return
        retention = max(b.max_window_s, 60.0)
        shared = self.processes > 1 if b.shared is None else b.shared
        # Shared without a configured store: one file per run that all the API servers find.
        path = (b.store or default_shared_path()) if shared else b.store
        if (self.ledger is not None and self._ledger_path == path
                and isinstance(self.ledger, SharedBudgetLedger) == shared):
            self.ledger.retention_s = max(self.ledger.retention_s, retention)
            self.ledger.reconfigure(self._windows_for)
            return
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        self._ledger_path = path
        try:
            if shared:
                self.ledger = SharedBudgetLedger(path, self._windows_for, retention_s=retention, clock=self._clock)
            else:
                self.ledger = BudgetLedger(path, self._windows_for, retention_s=retention, clock=self._clock)
            self.store_error = None
        except StoreError as e:
            self.store_error = str(e)
            self.failures["store"] += 1
            logger.warning("llmco2: admission: %s; budgets are %s", e,
                           "not enforced (fail_open): requests are admitted and counted as store_error"
                           if config.fail_open else "refusing requests (fail_open = false)")

    def reconfigure(self, config: AdmissionConfig) -> None:
        """Take a new config (reload): windows are rebuilt from the ledger's entries."""
        self.config = config
        self._open_ledger(config)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    # ------------------------------------------------------------------ decisions
    def _done(self, d: Decision) -> Decision:
        with self._count_lock:
            self.counts[(d.decision, d.reason)] += 1
        cb = self.on_decision
        if cb is not None:
            try:
                cb(d)
            except Exception as e:  # noqa: BLE001 - counting must never fail a request
                self.failures["on_decision"] += 1
                logger.debug("llmco2: admission on_decision failed: %s", e)
        return d

    def _refused(self, cfg: AdmissionConfig, kind: str, **kw: Any) -> Decision:
        if cfg.dry_run:
            kw.pop("status", None)
            retry = kw.pop("retry_after_s", None)
            d = Decision(WOULD[kind], admitted=True, **kw)
            if retry is not None:
                d.details["retry_after_s"] = retry
            d.max_tokens = None
            return d
        return Decision(kind, admitted=False, **kw)

    def decide(self, req: AdmissionRequest, now: float | None = None) -> Decision:
        cfg = self.config
        now = self._clock() if now is None else now
        tenant = req.tenant
        pred = req.predicted
        if pred is None:
            self.failures["predictor"] += 1
            if cfg.fail_open:
                return self._done(Decision(ADMIT, "no_prediction", "none", tenant, True))
            return self._done(Decision(REFUSE, "no_prediction", "none", tenant, False, status=503,
                                       message="llmco2 admission: no carbon prediction for this request and "
                                               "fail_open is false"))
        lowered: int | None = None
        # 1. per-request cap
        cap = cfg.request_cap
        if cap is not None:
            k = max(1, int(req.sequences))
            over = self._over_cap(cap, _scaled(pred, k))
            if over is not None:
                value, limit, unit = over
                new = None
                if cap.action == "lower_max_tokens" and req.what_if is not None:
                    what_if = req.what_if
                    new = self._lower(cap, lambda m: _scaled(what_if(m), k), pred.max_tokens)
                    if new is not None:
                        new = (what_if(new[1]) or new[0], new[1])
                if new is None:
                    d = self._refused(
                        cfg, REFUSE, reason="request_cap", policy="request_cap", tenant=tenant, status=429,
                        message=(f"llmco2 admission: predicted {cap.on} {'carbon' if unit == 'g' else 'energy'} "
                                 f"{_fmt(value)} {unit} is above the per-request limit {_fmt(limit)} {unit} "
                                 f"(policy request_cap, max_tokens {pred.max_tokens}"
                                 + (f", {k} sequences" if k > 1 else "") + ")"),
                        predicted_value=value, limit=limit, unit=unit)
                    if not d.admitted:
                        return self._done(d)
                    dry = d
                else:
                    lowered_pred, lowered = new
                    if cfg.dry_run:
                        dry = Decision(WOULD[LOWER], "request_cap", "request_cap", tenant, True,
                                       predicted_value=value, limit=limit, unit=unit,
                                       details={"max_tokens": lowered})
                        lowered = None
                    else:
                        pred = lowered_pred
                        dry = None
            else:
                dry = None
        else:
            dry = None
        # 2. grid-aware deferral
        df = cfg.deferral
        if df is not None and req.deferrable and self.intensity is not None:
            try:
                intensity = float(self.intensity.now_g_per_kwh(now))
                nxt = (self.intensity.next_below(df.max_intensity_g_per_kwh, now, df.horizon_s)
                       if intensity > df.max_intensity_g_per_kwh else None)
            except Exception as e:  # noqa: BLE001 - a failing intensity source must not fail requests
                self.failures["intensity"] += 1
                logger.debug("llmco2: admission: intensity source failed: %s", e)
                intensity, nxt = math.nan, None
            if intensity > df.max_intensity_g_per_kwh and nxt is not None and nxt > now:
                wait = nxt - now
                d = self._refused(
                    cfg, DEFER, reason="grid_intensity", policy="deferral", tenant=tenant, status=429,
                    retry_after_s=wait,
                    message=(f"llmco2 admission: deferred: grid carbon intensity {_fmt(intensity)} g/kWh is "
                             f"above {_fmt(df.max_intensity_g_per_kwh)} g/kWh (policy deferral); the next "
                             f"cleaner hour starts in {wait:.0f} s"),
                    predicted_value=intensity, limit=df.max_intensity_g_per_kwh, unit="g/kWh")
                if not d.admitted:
                    return self._done(d)
                dry = dry or d
        # 3. tenant budget
        b = cfg.budgets
        reserved = 0.0
        if b is not None:
            ledger = self.ledger
            budget: TenantBudget = b.budget_for(tenant)
            if ledger is None:
                self.failures["store"] += 1
                if not cfg.fail_open and budget.limited:
                    return self._done(Decision(REFUSE, "store_error", "budget", tenant, False, status=503,
                                               message=f"llmco2 admission: budget store unavailable "
                                                       f"({self.store_error}) and fail_open is false"))
                if budget.limited:
                    return self._done(self._with_priority(cfg, req, pred, Decision(
                        ADMIT, "store_error", "budget", tenant, True, max_tokens=lowered), budget))
            else:
                try:
                    refusal = ledger.try_reserve(tenant, req.request_id, pred.co2_g_upper, pred.co2_g, now,
                                                 force=cfg.dry_run)
                except Exception as e:  # noqa: BLE001 - fail-open boundary of the store
                    self.failures["store"] += 1
                    logger.warning("llmco2: admission: budget ledger failed: %s", e)
                    if not cfg.fail_open:
                        return self._done(Decision(REFUSE, "store_error", "budget", tenant, False, status=503,
                                                   message=f"llmco2 admission: budget ledger failed ({e})"))
                    return self._done(Decision(ADMIT, "store_error", "budget", tenant, True, max_tokens=lowered))
                if refusal is not None:
                    w = refusal.window
                    retry = refusal.retry_after_s
                    d = self._refused(
                        cfg, REFUSE, reason="tenant_budget", policy=f"budget:{tenant}:{w.seconds:g}s", tenant=tenant,
                        status=429, retry_after_s=retry,
                        message=(f"llmco2 admission: tenant {tenant!r} carbon budget of {_fmt(w.co2_g)} g per "
                                 f"{w.seconds:g} s is spent ({_fmt(refusal.spent_g)} g used or reserved; this "
                                 f"request's predicted upper bound is {_fmt(refusal.requested_g)} g)"
                                 + (f"; retry after {math.ceil(retry)} s" if retry is not None else
                                    "; this request alone is above the budget")),
                        predicted_value=refusal.requested_g, limit=w.co2_g,
                        details={"window_s": w.seconds, "spent_g": refusal.spent_g})
                    if not d.admitted:
                        return self._done(d)
                    dry = dry or d
                reserved = pred.co2_g_upper
        if dry is not None:
            dry.reserved_g = reserved
            return self._done(dry)
        d = Decision(LOWER if lowered is not None else ADMIT, "request_cap" if lowered is not None else "within_limits",
                     "request_cap" if lowered is not None else "none", tenant, True, max_tokens=lowered,
                     reserved_g=reserved)
        if lowered is not None and cap is not None:
            d.predicted_value, d.limit = (pred.co2_g_upper if cap.on == "upper" else pred.co2_g), cap.co2_g
        budget = b.budget_for(tenant) if b is not None else None
        return self._done(self._with_priority(cfg, req, pred, d, budget))

    @staticmethod
    def _over_cap(cap: Any, p: Predicted) -> tuple[float, float, str] | None:
        co2 = p.co2_g_upper if cap.on == "upper" else p.co2_g
        energy = p.energy_j_upper if cap.on == "upper" else p.energy_j
        if cap.co2_g is not None and co2 > cap.co2_g:
            return co2, cap.co2_g, "g"
        if cap.energy_j is not None and energy > cap.energy_j:
            return energy, cap.energy_j, "J"
        return None

    def _lower(self, cap: Any, what_if: Callable[[int], Predicted | None],
               max_tokens: int) -> tuple[Predicted, int] | None:
        """The largest max_tokens in [1, max_tokens) whose prediction is within the cap (the
        prediction grows with max_tokens: bisection, ~log2(max_tokens) table look-ups)."""
        lo, hi = 0, max_tokens - 1  # invariant: lo fits (0 = none found), everything above hi does not
        best: Predicted | None = None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            p = what_if(mid)
            if p is not None and self._over_cap(cap, p) is None:
                lo, best = mid, p
            else:
                hi = mid - 1
        if lo < 1:
            return None
        if best is None or best.max_tokens != lo:
            best = what_if(lo)
            if best is None or self._over_cap(cap, best) is not None:
                return None
        return best, lo

    def _with_priority(self, cfg: AdmissionConfig, req: AdmissionRequest, pred: Predicted,
                       d: Decision, budget: TenantBudget | None) -> Decision:
        pc = cfg.priority
        if pc is None or (req.client_priority != 0 and not pc.override_client):
            return d
        if pc.by == "carbon":
            d.priority = bisect.bisect_right(pc.co2_g_thresholds, pred.co2_g)
        else:
            cls = budget.tenant_class if budget is not None else None
            if cls is not None and cls in pc.classes:
                d.priority = pc.classes[cls]
        return d

    # ------------------------------------------------------------------ request life
    def finished(self, request_id: str, fallback_g: float | None = None) -> None:
        """The request finished or was aborted: its reservation settles at the measured value if
        one comes within ``settle_wait_s``, else at ``fallback_g`` (None: the expected value)."""
        ledger, b = self.ledger, self.config.budgets
        if ledger is not None and b is not None:
            try:
                ledger.end(request_id, fallback_g, b.settle_wait_s)
            except StoreError as e:  # shared store: counted; the reservation expires later
                self._store_failed(e)

    def measured(self, request_id: str, co2_g: float) -> None:
        """The request's measured final value (g CO2e)."""
        if self.ledger is not None:
            try:
                self.ledger.settle(request_id, co2_g, "measured")
            except StoreError as e:
                self._store_failed(e)

    def maintain(self) -> None:
        """Periodic: settle ended entries whose measurement did not come, expire lost reservations."""
        ledger, b = self.ledger, self.config.budgets
        if ledger is not None and b is not None:
            try:
                ledger.sweep()
                ledger.expire_stale(b.reservation_ttl_s)
            except StoreError as e:
                self._store_failed(e)

    def _store_failed(self, e: Exception) -> None:
        self.failures["store"] += 1
        logger.debug("llmco2: admission: budget store failed: %s", e)
