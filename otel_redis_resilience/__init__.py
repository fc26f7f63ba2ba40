"""Keep web apps serving when Redis is slow, flapping or down; show every decision in OpenTelemetry."""

from ._breaker import BreakerState, Transition
from ._config import BreakerPolicy, RetryPolicy, validate_deadline
from ._errors import ConfigurationError, RedisUnavailable
from ._events import (
    BreakerTransitioned,
    CallRejected,
    Endpoint,
    Event,
    FallbackUsed,
    Hook,
    OperationFinished,
    RetryScheduled,
)
from ._fallback import LastKnownGoodPolicy
from ._journal import JournalCorruptError, JournalError, JournalFullError
from ._resilience import RequestContext, Resilience
from ._safety import IDEMPOTENT_WRITES, READ_COMMANDS
from ._scope import NoActiveRequest, RequestScope, ScopeClosedError, current_redis, current_scope
from ._testing import is_testing, set_testing
from ._writebehind import WRITE_BEHIND_COMMANDS, Journaled, WriteBehindConfig, WriteBehindError

__version__ = "0.1.0"

# Telemetry and tracebacks name the public path, not the private module.
for _obj in (
    RedisUnavailable,
    ConfigurationError,
    NoActiveRequest,
    ScopeClosedError,
    BreakerState,
    Journaled,
    JournalFullError,
):
    _obj.__module__ = __name__
del _obj

__all__ = [
    "IDEMPOTENT_WRITES",
    "READ_COMMANDS",
    "WRITE_BEHIND_COMMANDS",
    "BreakerPolicy",
    "BreakerState",
    "BreakerTransitioned",
    "CallRejected",
    "ConfigurationError",
    "Endpoint",
    "Event",
    "FallbackUsed",
    "Hook",
    "JournalCorruptError",
    "JournalError",
    "JournalFullError",
    "Journaled",
    "LastKnownGoodPolicy",
    "NoActiveRequest",
    "OperationFinished",
    "RedisUnavailable",
    "RequestContext",
    "RequestScope",
    "Resilience",
    "RetryPolicy",
    "RetryScheduled",
    "ScopeClosedError",
    "Transition",
    "WriteBehindConfig",
    "WriteBehindError",
    "current_redis",
    "current_scope",
    "is_testing",
    "set_testing",
    "validate_deadline",
]
