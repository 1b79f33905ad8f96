"""Expected output length of a request before it runs: a trace prior, then learned per model.

Prior: the Azure LLM inference trace 2023 (conversation), summarised by
``benchmarks/make_output_prior.py`` into ``data/azure_output_prior.json`` (CC-BY 4.0,
Azure/AzurePublicDataset; Patel et al., "Splitwise", ISCA 2024): mean generated tokens 211.

Online: per model, an exponentially weighted mean of the generated tokens of finished requests.
The prior counts as ``prior_weight`` pseudo-observations, so the step size for the n-th
observation is ``max(alpha, 1 / (prior_weight + n))``: a running mean at first (the prior fades
after a few dozen requests), then an EWMA with memory ~1/alpha requests that follows drift.

A request's expected length is ``clip(round(mean), 1, max_tokens)``; its upper bound is
``max_tokens`` itself (:class:`OutputLengthEstimate`).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ["OutputPrior", "OutputLengthEstimate", "OutputLengthModel", "load_azure_prior"]

PRIOR_FILE = "azure_output_prior.json"


@dataclass(frozen=True)
class OutputPrior:
    """Generated tokens per request before anything was observed.

    Attributes:
        mean_tokens: mean generated tokens, tokens.
        median_tokens: median generated tokens, tokens (kept for reporting).
        source: where the numbers come from (goes into logs).
    """

    mean_tokens: float
    median_tokens: float
    source: str

    def __post_init__(self) -> None:
        for name in ("mean_tokens", "median_tokens"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 1):
                raise ValueError(f"{name} must be a finite number >= 1, got {v!r}")


@lru_cache(maxsize=2)
def load_azure_prior(trace: str = "conversation") -> OutputPrior:
    """The packaged Azure-trace prior (``trace`` = "conversation" or "code"), read once."""
    doc = json.loads(resources.files("llmco2_serve.data").joinpath(PRIOR_FILE).read_text(encoding="utf-8"))
    try:
        t = doc["traces"][trace]
    except KeyError:
        raise ValueError(f"trace must be one of {sorted(doc['traces'])}, got {trace!r}") from None
    gen = t["generated_tokens"]
    return OutputPrior(
        mean_tokens=float(gen["mean"]),
        median_tokens=float(gen["quantiles"]["0.5"]),
        source=f"Azure LLM trace 2023 ({trace}, n={t['n_requests']}, {doc['license']})",
    )


@dataclass(frozen=True)
class OutputLengthEstimate:
    """Expected and worst-case generated tokens of one request (both >= 1, expected <= upper)."""

    expected_tokens: int
    upper_tokens: int
    source: str  # "prior" or "learned"


class OutputLengthModel:
    """Per-model expected output length (module docstring). Thread-safe; O(1) per call.

    Args:
        prior: the starting point (default: the Azure conversation trace).
        alpha: EWMA step once the prior has faded, in (0, 1].
        prior_weight: pseudo-observations the prior counts for, >= 1.
    """

    def __init__(self, prior: OutputPrior | None = None, *, alpha: float = 0.05, prior_weight: float = 5.0) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not prior_weight >= 1:
            raise ValueError(f"prior_weight must be >= 1, got {prior_weight!r}")
        self.prior = prior if prior is not None else load_azure_prior()
        self.alpha = float(alpha)
        self.prior_weight = float(prior_weight)
        self._lock = threading.Lock()
        self._mean: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def mean_tokens(self, model: str) -> float:
        """Current expected generated tokens of ``model`` before any max_tokens cap."""
        return self._mean.get(model, self.prior.mean_tokens)

    def observations(self, model: str) -> int:
        return self._n.get(model, 0)

    def estimate(self, model: str, max_tokens: int) -> OutputLengthEstimate:
        """Expected tokens, capped to ``max_tokens``; the upper bound is ``max_tokens``."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        mean = self.mean_tokens(model)
        expected = min(max_tokens, max(1, int(round(mean))))
        return OutputLengthEstimate(expected, max_tokens, "learned" if model in self._n else "prior")

    def observe(self, model: str, gen_tokens: int, max_tokens: int | None = None) -> None:
        """Learn from one finished request. ``gen_tokens`` above ``max_tokens`` is capped to it
        (it cannot happen in vLLM, but a bad caller must not drag the mean)."""
        if isinstance(gen_tokens, bool) or not isinstance(gen_tokens, int) or gen_tokens < 0:
            raise ValueError(f"gen_tokens must be an int >= 0, got {gen_tokens!r}")
        x = float(min(gen_tokens, max_tokens) if max_tokens is not None else gen_tokens)
        with self._lock:
            n = self._n.get(model, 0) + 1
            mean = self._mean.get(model, self.prior.mean_tokens)
            step = max(self.alpha, 1.0 / (self.prior_weight + n))
            self._mean[model] = mean + step * (x - mean)
            self._n[model] = n
