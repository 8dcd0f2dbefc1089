"""Settings shared by a manager and everything it owns."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PROGRESS_MODES", "Config", "ProgressMode"]

ProgressMode = Literal["blocking", "polling", "efficient"]

#: What each progress mode does, and the names it also answers to.
PROGRESS_MODES: dict[str, str] = {
    "blocking": "spin while traffic flows, then sleep on the worker's fd (balanced)",
    "polling": "never sleep: lowest latency, one core busy per process (latency)",
    "efficient": "sleep on the fd as soon as nothing is pending (lowest CPU)",
}
_ALIASES = {"balanced": "blocking", "latency": "polling", "sleep": "efficient"}


class Config(BaseSettings):
    """Configuration of a :class:`~ucxrpc.Manager`.

    Every field can also be set from the environment as ``UCXRPC_<FIELD>`` (for
    example ``UCXRPC_PROGRESS_MODE=polling`` or
    ``UCXRPC_UCX_OPTIONS='{"TLS": "tcp"}'``).
    """

    model_config = SettingsConfigDict(env_prefix="UCXRPC_", frozen=True, extra="forbid")

    progress_mode: ProgressMode = Field(
        "blocking",
        description="blocking (balanced, default), polling (latency) or efficient",
    )
    spin_us: float = Field(
        200.0,
        ge=0,
        description="blocking mode: how long the engine keeps polling after the last "
        "event before it sleeps on the worker's fd (should outlast a round trip)",
    )
    reply_spin_us: float = Field(
        2000.0,
        ge=0,
        description="blocking mode: how long the engine keeps polling after the last "
        "event while a call awaits its reply (a reply on its way is cheaper to catch "
        "by polling than by waking from the fd)",
    )
    sched_slice_us: float = Field(
        100.0,
        ge=0,
        le=100_000,
        description="the scheduler slice (Linux 6.12+) the event loop's thread asks for "
        "while one or two replies (or messages) are awaited and no more were in the last "
        "second, so that on a busy machine a reply's wake-up can displace a busy process "
        "at once; the kernel's default is back a second after the last such wait, or as "
        "soon as more are awaited (0: never ask; the kernel grants 100 at least)",
    )
    ucx_options: dict[str, str] = Field(
        default_factory=dict,
        description="UCX settings without the UCX_ prefix, e.g. {'TLS': 'tcp'}",
    )
    peer_error_handling: bool = Field(
        True,
        description="create UCX endpoints with peer error handling (the safe default): "
        "a peer that dies mid-transfer fails its requests instead of aborting or wedging "
        "this process. UCX then uses TCP (or RDMA) even on one host. False allows shared "
        "memory (faster on one host) at a documented risk: with CMA a peer killed "
        "mid-transfer aborts the survivor; without CMA it can wedge shared-memory "
        "delivery for good",
    )
    shared_memory: bool = Field(
        True,
        description="between processes on one host, send large parts through sealed "
        "memory files the receiver maps (no copy through TCP, and safe when either side "
        "dies); used only when the handshake proves both sides can open each other's "
        "files (Linux, one pid namespace, the same user)",
    )
    shared_reads: bool = Field(
        True,
        description="with shared_memory, let the receiver copy a large part straight out "
        "of the sender's memory (process_vm_readv: one copy, no file) where the kernel "
        "allows it (the same user, no ptrace restriction); memory files otherwise",
    )
    shared_frames: bool = Field(
        True,
        description="with shared_reads, carry small frames (up to 16 KiB) between "
        "processes on one host through a shared-memory ring per connection (and "
        "direction) instead of UCX's TCP; used where both sides proved they may read "
        "each other's memory (Linux on x86-64)",
    )
    shared_min: int = Field(
        256 * 1024,
        ge=256 * 1024,
        description="a frame with a part at least this large sends its parts shared "
        "(shared_memory)",
    )
    max_message_size: int = Field(
        256 * 1024 * 1024, gt=0, description="largest message sent or accepted (bytes)"
    )
    receive_budget: int = Field(
        1024 * 1024 * 1024,
        gt=0,
        description="data-part bytes one connection may have announced and not yet "
        "delivered (at least max_message_size); beyond it a call gets ResourceExhausted",
    )
    part_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a frame may wait for the data parts it announced; then its "
        "call fails with ProtocolError and the parts are forgotten",
    )
    max_inflight: int = Field(
        1024, gt=0, description="calls in flight per connection (client waits, server refuses)"
    )
    connect_timeout: float = Field(10.0, gt=0, description="seconds to set up a connection")
    max_handshakes: int = Field(
        256,
        ge=1,
        description="control connections a server holds before their handshake ends; one "
        "more closes the oldest (a good client's handshake takes milliseconds, so the "
        "oldest is the likeliest to be stalled)",
    )
    auth_token: SecretStr | None = Field(None, description="shared secret for connections")
    reply_slot_size: int = Field(
        4096,
        ge=256,
        le=8192,
        description="no longer used (replies are found by probe at their exact size); "
        "accepted so existing settings keep working",
    )
    oob_threshold: int = Field(
        16 * 1024, ge=1024, description="bytes-like values this large travel out of band"
    )
    stream_window: int = Field(
        64,
        ge=1,
        le=65536,
        description="stream items a server may send ahead of the consumer (flow control)",
    )
    expose_tracebacks: bool = Field(
        False,
        description="send handler tracebacks to callers in RemoteError (off by default: "
        "a traceback shows the server's paths, code and values; turn it on in development)",
    )

    @field_validator("progress_mode", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return _ALIASES.get(value, value)
        return value

    @field_validator("ucx_options", mode="before")
    @classmethod
    def _strip_prefix(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                (k[4:] if str(k).upper().startswith("UCX_") else str(k)).upper(): str(v)
                for k, v in value.items()
            }
        return value
