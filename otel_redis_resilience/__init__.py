"""Keep web apps serving when Redis is slow, flapping or down; show every decision in OpenTelemetry."""

from ._decide.breaker import BreakerState, Transition
from ._decide.commands import COMMAND_TABLE, IDEMPOTENT_WRITES, READ_COMMANDS, RETRY_SAFE, CommandSafety
from ._decide.config import BreakerPolicy, RetryPolicy, validate_deadline
from ._errors import ConfigurationError, RedisUnavailable
from ._fallback import LastKnownGoodPolicy
from ._observe.events import (
    BreakerTransitioned,
    CallRejected,
    Endpoint,
    Event,
    FallbackUsed,
    Hook,
    OperationFinished,
    RetryScheduled,
)
from ._request import RequestContext
from ._resilience import Resilience
from ._scope import NoActiveRequest, RequestScope, ScopeClosedError, current_redis, current_scope
from ._testing import is_testing, set_testing
from ._version import __version__ as __version__
from ._writebehind import (
    WRITE_BEHIND_COMMANDS,
    DeadLetter,
    JournalCorruptError,
    Journaled,
    JournalError,
    JournalFullError,
    LeaseLostError,
    ReplayProtocolError,
    ReplayStalledError,
    WriteBehindConfig,
    WriteBehindError,
    WriteBehindJournal,
)

__all__ = [
    "COMMAND_TABLE",
    "IDEMPOTENT_WRITES",
    "READ_COMMANDS",
    "RETRY_SAFE",
    "WRITE_BEHIND_COMMANDS",
    "BreakerPolicy",
    "BreakerState",
    "BreakerTransitioned",
    "CallRejected",
    "CommandSafety",
    "ConfigurationError",
    "DeadLetter",
    "Endpoint",
    "Event",
    "FallbackUsed",
    "Hook",
    "JournalCorruptError",
    "JournalError",
    "JournalFullError",
    "Journaled",
    "LastKnownGoodPolicy",
    "LeaseLostError",
    "NoActiveRequest",
    "OperationFinished",
    "RedisUnavailable",
    "ReplayProtocolError",
    "ReplayStalledError",
    "RequestContext",
    "RequestScope",
    "Resilience",
    "RetryPolicy",
    "RetryScheduled",
    "ScopeClosedError",
    "Transition",
    "WriteBehindConfig",
    "WriteBehindError",
    "WriteBehindJournal",
    "current_redis",
    "current_scope",
    "is_testing",
    "set_testing",
    "validate_deadline",
]

# Reprs, tracebacks, telemetry and pickles name the public path, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith(__name__ + "."):
        _obj.__module__ = __name__
del _name, _obj
