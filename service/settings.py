"""Service configuration, read once from ``UPSELL_*`` environment variables.

Build it with ``load_settings()`` (or ``Settings(...)`` in tests); nothing reads the
environment at import time. The README's configuration table lists the same fields and a
test keeps the two in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting, with its default; the env var is ``UPSELL_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="UPSELL_", extra="ignore", frozen=True)

    redis_url: str | None = Field(
        default=None,
        description="Redis URL for the snapshot store; unset = the in-process store.",
    )
    redis_prefix: str = Field(default="upsell", description="Prefix of every Redis key.")
    state_dir: Path = Field(
        default=Path("var/state"),
        description="Where the in-process store persists snapshots (shared by CLI and server).",
    )
    artifacts_dir: Path = Field(
        default=Path("var/artifacts"), description="Where `upsell train` writes model artifacts."
    )
    data_dir: Path = Field(
        default=Path("var/data"), description="Where `upsell import` writes contract files."
    )
    policy_path: Path | None = Field(
        default=None, description="Policy YAML; unset = the packaged rules/policies/default.yaml."
    )
    snapshot_keep: int = Field(default=3, ge=2, description="Snapshot versions retained.")
    snapshot_refresh_seconds: float = Field(
        default=1.0, ge=0, description="How often a replica checks for a newer snapshot."
    )
    stock_mirror: bool = Field(
        default=False,
        description="Keep the serving version's stock in each worker, followed from Redis's "
        "change streams, instead of reading Redis per request (single Redis only; "
        "docs/operations.md).",
    )
    stock_mirror_max_lag_seconds: float = Field(
        default=1.0,
        gt=0.25,
        description="The stock mirror is used only while Redis answered its follower this "
        "recently; otherwise requests read Redis.",
    )
    generation_memory_lists: int = Field(
        default=4096,
        ge=0,
        description="Candidate lists each worker remembers for guests (same basket or "
        "product, same region): the model's proposal is reused, the rules still judge it "
        "afresh; about 3 kB a list. 0 = generate every time.",
    )
    host: str = Field(default="127.0.0.1", description="Address `upsell serve` binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `upsell serve` binds.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level."
    )
    log_json: bool = Field(default=True, description="JSON logs (false: console rendering).")
    admin_token: SecretStr | None = Field(
        default=None,
        description="A credential with the admin scope (all scopes), besides the keys file; "
        "unset = none.",
    )

    client_key: SecretStr | None = Field(
        default=None,
        description="The key `upsell policy reload` sends to a running service (one with the "
        "admin scope from its keys file); unset = UPSELL_ADMIN_TOKEN.",
    )

    # Callers: API keys, rate limits and input limits (docs/operations.md).
    auth: Literal["keys", "off"] = Field(
        default="keys",
        description="keys: every call but health, metrics and docs needs an API key; off: "
        "channel calls are open (the local demo), admin and events still need a key.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="YAML file of API keys (name, sha256, scopes, rate_limit); unset = no "
        "keys, so with UPSELL_AUTH=keys every protected call is refused.",
    )
    api_keys_reload_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How often each worker checks the keys file: a changed file is loaded "
        "while serving (a bad one is refused, logged, and the keys before stay); 0 = read "
        "once at start.",
    )
    rate_limit_per_second: float = Field(
        default=100.0,
        ge=0,
        description="Requests per second a key may make unless its entry "
        "says otherwise; 0 = unlimited.",
    )
    rate_limit_burst: int = Field(
        default=200, ge=1, description="Requests a key may make at once (bucket size)."
    )
    max_body_bytes: int = Field(
        default=65536, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_batch_body_bytes: int = Field(
        default=8388608,
        ge=1024,
        description="Largest body of a batch endpoint (/v1/admin/*, /v1/events/*).",
    )
    log_requests: bool = Field(
        default=True, description="One `request` log line per HTTP request (ids hashed)."
    )

    # Experiments and the ROI report (service/exposures.py, service/outcomes.py, service/roi).
    customer_hash_key: SecretStr | None = Field(
        default=None,
        description="Key of the hash replacing customer and session ids in exposures and "
        "orders; unset = a random key kept in UPSELL_STATE_DIR (one host only).",
    )
    exposures_max_len: int = Field(
        default=1_000_000,
        ge=1000,
        description="Exposures the Redis stream keeps (approximately); export before older "
        "ones are trimmed.",
    )
    exposures_buffer: int = Field(
        default=10_000,
        ge=1,
        description="Exposures waiting to be written, at most (more are dropped and counted).",
    )

    # Explanations (service/explain): LLM text when it fits the channel's budget, else templates.
    anthropic_api_key: SecretStr | None = Field(
        default=None, description="Anthropic API key; unset = template explanations only."
    )
    anthropic_base_url: str | None = Field(
        default=None, description="Messages API base URL; unset = the SDK's default."
    )
    llm_model: str = Field(default="claude-haiku-4-5", description="Model writing explanations.")
    llm_price_input_per_mtok: float = Field(
        default=1.0, ge=0, description="USD per million input tokens, for the cost estimate."
    )
    llm_price_output_per_mtok: float = Field(
        default=5.0, ge=0, description="USD per million output tokens, for the cost estimate."
    )
    llm_breaker_failures: int = Field(
        default=5, ge=1, description="Consecutive LLM failures or timeouts that open the breaker."
    )
    llm_breaker_cooldown_seconds: float = Field(
        default=30.0, ge=0, description="How long the open breaker stops LLM calls before a probe."
    )
    llm_min_budget_ms: int = Field(
        default=400, ge=0, description="An LLM call is tried only when this much budget remains."
    )
    deadline_cart_ms: int = Field(
        default=25, ge=1, description="Server-side budget of a cart request, explanation included."
    )
    deadline_pdp_ms: int = Field(
        default=25, ge=1, description="Server-side budget of a PDP request, explanation included."
    )
    deadline_pos_ms: int = Field(
        default=15, ge=1, description="Server-side budget of a POS request, explanation included."
    )
    deadline_contact_center_ms: int = Field(
        default=1500, ge=1, description="Server-side budget of a contact-center request."
    )
    explain_locale: str = Field(
        default="en",
        description="Locale of explanations for a request that names none: en or de "
        "(others read English).",
    )
    explain_max_chars: int = Field(
        default=160, ge=20, description="Longest LLM explanation accepted, in characters."
    )
    explain_banned_words: str = Field(
        default="guaranteed,miracle,cure,risk-free,cheapest",
        description="Comma-separated words and phrases LLM text may never contain.",
    )
    explain_cache_ttl_seconds: int = Field(
        default=604800, ge=1, description="How long a generated explanation is reused."
    )
    explain_cache_max_entries: int = Field(
        default=100000, ge=1, description="Entries of the in-process explanation cache."
    )
    explain_queue_size: int = Field(
        default=1000, ge=1, description="Explanations waiting for background generation, at most."
    )
    explain_concurrency: int = Field(
        default=4, ge=1, description="Background LLM calls in flight, at most."
    )
    explain_background_timeout_ms: int = Field(
        default=10000, ge=1, description="Time limit of one background LLM call."
    )
    explain_retry_backoff_seconds: float = Field(
        default=600.0, ge=0, description="A pair whose generation failed is not retried sooner."
    )
    explain_stats_log_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How often the explanation accounting is logged; 0 = only at shutdown.",
    )


def load_settings() -> Settings:
    """Settings from the environment (and nothing else)."""
    return Settings()
