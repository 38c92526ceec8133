"""Rules marked to roll out: a matched rule with ``[rules.rollout]`` starts a staged roll-out.

The roll-out goes through the engine's own start (:meth:`RolloutEngine.create`, as
``rollout.start``) over the rule's targets with the rule's changes; it is named
``rule:<rule>@<event id>`` and started by ``rule:<rule>``. A re-sent event finds the roll-out
of that name and starts no second one; keys an operator pinned on a target leave that target out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sdk.coord.coordinator.desired_ops import drop_pinned
from sdk.coord.coordinator.rollouts import RolloutSpec
from sdk.coord.coordinator.rules import Action
from sdk.coord.errors import CoordinationError, OperatorError

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator

log = logging.getLogger(__name__)


def rollout_name(rule: str, event_id: str) -> str:
    """The name (and source) of the roll-out ``rule`` started for event ``event_id``."""
    return f"rule:{rule}@{event_id}"


def rollout_spec(action: Action, name: str) -> RolloutSpec:
    """The :class:`RolloutSpec` of a matched roll-out rule."""
    plan = action.rollout
    assert plan is not None
    sets = {k: v for k, v in action.changes.items() if v is not None}
    unset = tuple(k for k, v in action.changes.items() if v is None)
    return RolloutSpec(name, {"rule": action.rule, "targets": len(action.targets)}, sets, unset,
                       dict(plan.canary), dict(plan.growth), plan.bake, plan.gates)


async def start_rule_rollouts(coordinator: Coordinator, sender: str, event_id: str,
                              actions: Iterable[Action]) -> bool:
    """Start one roll-out per matched roll-out rule of ``sender``'s event ``event_id``.

    False when one could not be durably started (the event is then left unacknowledged, and a
    re-send starts only the missing ones)."""
    engine = coordinator.rollouts
    store = coordinator.store
    assert store is not None
    for action in actions:
        if action.rollout is None:
            continue
        name = rollout_name(action.rule, event_id)
        if any(r.spec.name == name for r in engine.rollouts.values()):
            log.info("event %s from %s: roll-out %s already started", event_id, sender, name)
            continue
        kept = drop_pinned(store, {did: (action.changes, (action.rule,)) for did in action.targets})
        dids = sorted(did for did, (changes, _) in kept.items() if len(changes) == len(action.changes))
        if not dids:
            log.info("event %s: rule %s selected no device without pinned keys; no roll-out", event_id,
                     action.rule)
            continue
        try:
            r = await engine.create(rollout_spec(action, name), dids, operator=f"rule:{action.rule}")
        except OperatorError as exc:
            if exc.reason != "invalid_params":
                log.error("event %s from %s: roll-out of rule %s not started: %s", event_id, sender,
                          action.rule, exc)
                return False
            log.error("event %s from %s: rule %s's change cannot be rolled out: %s", event_id, sender,
                      action.rule, exc)
        except CoordinationError as exc:
            log.error("event %s from %s: roll-out of rule %s not started: %s", event_id, sender, action.rule, exc)
            return False
        else:
            log.info("event %s from %s: rule %s rolls out as %s over %d device(s), stages %s", event_id, sender,
                     action.rule, r.id, len(dids), r.sizes)
    return True


__all__ = ["rollout_name", "rollout_spec", "start_rule_rollouts"]
