"""The front door's typed config: request size limits, queue bounds, Retry-After, API keys.

`AppConfig.front` (the `front:` section of the app args). Everything here is checked
before a request reaches the step loop; see specserve_ray/api/front.py.

Queueing rule (so that this project's bound refuses first, with a Retry-After, and
Serve never queues requests on its own): Serve's per-replica `max_ongoing_requests`
must be at least `engine.limits.max_num_seqs + max_queued_requests` (running + waiting);
see `serve_queue_problem`.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FrontDoorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest HTTP request body; "
                                "larger ones get 413 before the body is read or parsed "
                                "(Content-Length checked first, then the bytes as they "
                                "arrive).")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Most prompt tokens a "
                                          "request may send (None = the context length "
                                          "minus one output token).")
    max_prompt_chars: int | None = Field(None, ge=1, description="Text prompts longer than "
                                         "this are refused before tokenizing (None = "
                                         "max_prompt_tokens x the longest token in the "
                                         "vocabulary, which no fitting prompt exceeds).")
    max_stop_strings: int = Field(16, ge=0, le=1024, description="Most stop strings per "
                                  "request.")
    max_stop_chars: int = Field(256, ge=1, description="Longest stop string (characters).")
    max_queued_tokens: int | None = Field(None, ge=1, description="Bound on prompt + "
                                          "max_tokens summed over waiting requests; past it "
                                          "new requests get 429 (None = only the request "
                                          "count bound, max_queued_requests).")
    retry_after_min_s: float = Field(1.0, ge=0, description="Floor of the Retry-After "
                                     "estimate (seconds).")
    retry_after_max_s: float = Field(60.0, gt=0, description="Ceiling of the Retry-After "
                                     "estimate; also the answer while nothing drains.")
    api_key_file: str | None = Field(None, description="File with API keys, one per line "
                                     "('#' comments); keys from SPECSERVE_API_KEY are "
                                     "added. Any key configured turns checking on for HTTP "
                                     "and gRPC (/health stays open).")

    @model_validator(mode="after")
    def _retry_bounds(self) -> "FrontDoorConfig":
        if self.retry_after_min_s > self.retry_after_max_s:
            raise ValueError("retry_after_min_s must not exceed retry_after_max_s")
        return self


def serve_queue_problem(max_ongoing_requests: int, max_num_seqs: int,
                        max_queued_requests: int) -> str | None:
    """A message naming the keys and values when Serve would queue requests before this
    project's bound refuses them (None when the configuration is consistent)."""
    need = max_num_seqs + max_queued_requests
    if max_ongoing_requests < need:
        return (f"max_ongoing_requests ({max_ongoing_requests}) is below "
                f"engine.limits.max_num_seqs + max_queued_requests ({max_num_seqs} + "
                f"{max_queued_requests} = {need}): Serve would queue requests itself, without "
                f"bound or Retry-After; set max_ongoing_requests >= {need} (in the app args "
                "and in the deployment's settings) or lower the other two")
    return None


def check_serve_queue(max_ongoing_requests: int, max_num_seqs: int,
                      max_queued_requests: int, where: str) -> None:
    """Raise ValueError (`where` says which config) when the queueing rule is broken."""
    problem = serve_queue_problem(max_ongoing_requests, max_num_seqs, max_queued_requests)
    if problem:
        raise ValueError(f"invalid {where}: {problem}")
