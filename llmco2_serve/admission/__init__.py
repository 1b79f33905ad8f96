"""Carbon-aware admission control (issue 9): per-request caps, tenant budgets over rolling windows,
priority and grid-aware deferral, decided from each request's predicted carbon. Independent of
vLLM; ``hooks/admission.py`` connects it to vLLM's OpenAI server."""

from .config import AdmissionConfig, AdmissionConfigError, ConfigWatcher, config_from_settings, load_config_file, parse_config
from .controller import AdmissionController, AdmissionRequest, Decision, IntensitySource, Predicted, StaticIntensity, tenant_from_headers
from .ledger import BudgetLedger, SharedBudgetLedger, StoreError

__all__ = ["AdmissionConfig", "AdmissionConfigError", "AdmissionController", "AdmissionRequest", "BudgetLedger",
           "ConfigWatcher", "Decision", "IntensitySource", "Predicted", "SharedBudgetLedger", "StaticIntensity", "StoreError",
           "config_from_settings", "load_config_file", "parse_config", "tenant_from_headers"]
