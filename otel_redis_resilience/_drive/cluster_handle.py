"""What the sync and asyncio cluster handles share: degraded replies, batches' commands, pipelines."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.client import list_or_args  # type: ignore[attr-defined]

from .._decide.commands import command_name
from .._errors import ConfigurationError
from .._fallback import NORMAL, recover
from .._handle import HandleBase, make_class
from .cluster_batch import Command, Part, combine


class ClusterHandleBase(HandleBase):
    """Mixed into both cluster handles, ahead of redis-py's cluster client class."""

    def _orr_decodes(self) -> bool:
        return bool(self.get_encoder().decode_responses)  # type: ignore[attr-defined]

    def _orr_recover(self) -> Callable[[Command, Exception], Any] | None:
        """How a degraded view answers one failed command of a batch (None: the plain handle raises)."""
        mode = self._orr_mode
        if mode == NORMAL:
            return None
        core, scope, decode = self._orr_core, self._orr_scope, self._orr_decodes()

        def answer(cmd: Command, exc: Exception) -> Any:
            args, options = cmd
            return recover(
                mode, core.lkg, core.telemetry, command_name(args), args, options, exc, scope, decode=decode
            )

        return answer

    def _orr_combine(
        self,
        commands: Sequence[Command],
        parts: list[Part],
        outcomes: Sequence[list[Any] | BaseException],
        raise_on_error: bool,
    ) -> list[Any]:
        return combine(
            len(commands),
            parts,
            list(outcomes),
            raise_on_error=raise_on_error,
            recover=self._orr_recover(),
            commands=commands,
        )

    def _orr_mget(self, keys: Any, args: Sequence[Any]) -> tuple[list[Any], Any, list[Command]]:
        """The keys, redis-py's slot partition, and one MGET per slot."""
        keys = list_or_args(keys, args)
        slots_to_keys = self._partition_keys_by_slot(keys)  # type: ignore[attr-defined]
        return keys, slots_to_keys, [(("MGET", *ks), {}) for ks in slots_to_keys.values()]

    def _orr_mset(self, mapping: Mapping[Any, Any]) -> list[Command]:
        slots_to_pairs = self._partition_pairs_by_slot(mapping)  # type: ignore[attr-defined]
        return [(("MSET", *pairs), {}) for pairs in slots_to_pairs.values()]

    def _orr_pipeline(self, transaction: Any, shard_hint: Any, hooks: type, cache: dict[type, type]) -> Any:
        if transaction:
            raise ConfigurationError(
                "cluster transactions (pipeline(transaction=True)) are not routed through the "
                "breakers yet: use the client directly, or a plain pipeline()"
            )
        pipe: Any = super().pipeline(transaction, shard_hint)  # type: ignore[misc]
        pipe.__class__ = make_class(cache, hooks, type(pipe))
        pipe._orr_handle = self
        return pipe
