"""Planning an emergency evacuation: every VM off the failing host(s), within capacity.

The planner never decides *whether* a VM may go somewhere — that is
``decisions``'s job and arrives here as each VM's allowed-target set. It only
chooses among allowed hosts, respecting free memory and vCPUs as libvirt reports
them minus what earlier moves in the same plan take, preferring the VM's own
region and spreading load.

Order matters: VMs with the fewest allowed targets are placed first (the most
constrained first heuristic), largest memory first among equals, so that a
flexible VM does not take the only slot a constrained VM could use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .inventory import HostFacts
from .reasons import Reason

#: Domain states that hold their memory and vCPUs on a host (everything but off/crashed).
_INACTIVE_STATES = frozenset({"shut off", "crashed"})


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a candidate host can still take."""

    name: str
    region: str
    free_memory_mib: int
    free_vcpus: int


@dataclass(frozen=True, slots=True)
class Evacuee:
    uuid: str
    name: str
    source: str
    region: str  # the source host's region
    memory_mib: int
    vcpus: int
    owner: str
    allowed: frozenset[str]  # hosts the VM may go to now (policy, grant, certificate)


@dataclass(frozen=True, slots=True)
class Move:
    vm: Evacuee
    target: str


@dataclass(frozen=True, slots=True)
class Stuck:
    """A VM with no possible target: every candidate host and why not, and whom to call."""

    vm: Evacuee
    why_not: tuple[tuple[str, tuple[Reason, ...]], ...]

    @property
    def owner_to_contact(self) -> str:
        return self.vm.owner


@dataclass
class EvacuationPlan:
    sources: tuple[str, ...]
    moves: list[Move] = field(default_factory=list)
    stuck: list[Stuck] = field(default_factory=list)
    dropped: list[Evacuee] = field(default_factory=list)  # removed by the admin while editing

    def load(self) -> dict[str, tuple[int, int]]:
        """Memory MiB and vCPUs the plan puts on each target."""
        out: dict[str, tuple[int, int]] = {}
        for m in self.moves:
            mem, cpu = out.get(m.target, (0, 0))
            out[m.target] = (mem + m.vm.memory_mib, cpu + m.vm.vcpus)
        return out


def capacity_from_facts(name: str, region: str, facts: HostFacts, *, vcpu_ratio: float = 1.0,
                        kernel_free: bool = True) -> Capacity:
    """What libvirt says a host can still take, counted conservatively.

    Memory: the smaller of the kernel's free memory (``virNodeGetFreeMemory``) and the
    host's memory minus what its active domains were given. The second bound matters
    because guests touch their RAM lazily: a host whose guests have not yet used their
    memory looks free to the kernel but is already promised. vCPUs: ``cpus * vcpu_ratio``
    minus the vCPUs of active domains. The ratio defaults to 1.0 (no overcommit): in an
    emergency we would rather leave a VM stuck and say so than overload the host that is
    supposed to save it; an admin who overcommits on purpose passes a larger ratio.
    ``kernel_free=False`` ignores the kernel's figure (libvirt's test driver, used by
    the demo, cannot report it and says 0).
    """
    active = [d for d in facts.domains if d.state not in _INACTIVE_STATES]
    free_cpu = int(facts.cpus * vcpu_ratio) - sum(d.vcpus for d in active)
    return Capacity(name, region, memory_room(facts, kernel_free=kernel_free), max(0, free_cpu))


def memory_room(facts: HostFacts, *, kernel_free: bool = True) -> int:
    """MiB of memory a host can still take: the smaller of the kernel's free memory and the
    host's memory minus what its active domains were given (see ``capacity_from_facts``).

    The one rule for the planner, the pre-flight and the just-in-time check right before
    ``migrate3`` (services/migration.py), so a target's memory promised to guests that have
    not touched it yet is never handed out twice by a later check.
    """
    promised = sum(d.memory_mib for d in facts.domains if d.state not in _INACTIVE_STATES)
    room = facts.memory_mib - promised
    if kernel_free:
        room = min(facts.free_memory_mib, room)
    return max(0, room)


def group_reasons(why_not: Iterable[tuple[str, tuple[Reason, ...]]]) -> list[tuple[Reason, list[str]]]:
    """A stuck VM's refusals grouped by reason code: (first reason, hosts), most hosts first.

    With a thousand candidate hosts, one line per host is unreadable; "ca.not_trusted:
    870 hosts" plus the hosts with a rarer reason is what the admin needs to act on.
    """
    groups: dict[str, tuple[Reason, list[str]]] = {}
    for host, reasons in why_not:
        for r in reasons or (Reason("plan.unknown", f"{host} was not considered."),):
            if r.severity != "error":
                continue
            entry = groups.setdefault(r.code, (r, []))
            if host not in entry[1]:
                entry[1].append(host)
    return sorted(groups.values(), key=lambda g: (-len(g[1]), g[0].code))


def _no_room(host: Capacity, vm: Evacuee) -> Reason:
    lacks = []
    if host.free_memory_mib < vm.memory_mib:
        lacks.append(f"{host.free_memory_mib} MiB free of the {vm.memory_mib} MiB needed")
    if host.free_vcpus < vm.vcpus:
        lacks.append(f"{host.free_vcpus} vCPUs free of the {vm.vcpus} needed")
    return Reason(
        "capacity.full",
        f"{host.name} is allowed but has no room left in this plan: {' and '.join(lacks)}.",
        "Drop or move another VM from the plan, or free capacity on the host.",
    )


def room_reason(host: Capacity, vm: Evacuee) -> Reason:
    """``capacity.full``: the host is allowed but ``host`` (what is left of it) lacks room."""
    return _no_room(host, vm)


def plan_evacuation(
    vms: Iterable[Evacuee],
    hosts: Iterable[Capacity],
    why_not: Callable[[Evacuee, str], tuple[Reason, ...]],
    *,
    sources: Sequence[str] = (),
) -> EvacuationPlan:
    """Place every VM on an allowed host with room; list the rest with reasons.

    ``why_not(vm, host)`` gives the refusal reasons for a host outside the VM's
    allowed set; it is called only for VMs that end up stuck, so the common case
    costs set operations only.
    """
    source_set = frozenset(sources)
    free: dict[str, Capacity] = {h.name: h for h in hosts if h.name not in source_set}
    plan = EvacuationPlan(sources=tuple(sources))
    ordered = sorted(vms, key=lambda v: (len(v.allowed), -v.memory_mib, -v.vcpus, v.name))
    for vm in ordered:
        best: Capacity | None = None
        best_key: tuple[int, float, str] | None = None
        for name in vm.allowed:
            host = free.get(name)
            if host is None or host.free_memory_mib < vm.memory_mib or host.free_vcpus < vm.vcpus:
                continue
            # Same region first, then the host left with the most free memory (spreads load).
            key = (0 if host.region == vm.region else 1, -(host.free_memory_mib - vm.memory_mib), name)
            if best_key is None or key < best_key:
                best, best_key = host, key
        if best is not None:
            plan.moves.append(Move(vm, best.name))
            free[best.name] = replace(best, free_memory_mib=best.free_memory_mib - vm.memory_mib,
                                      free_vcpus=best.free_vcpus - vm.vcpus)
            continue
        reasons: list[tuple[str, tuple[Reason, ...]]] = []
        for name in sorted(free):
            if name in vm.allowed:
                reasons.append((name, (_no_room(free[name], vm),)))
            else:
                reasons.append((name, why_not(vm, name)))
        plan.stuck.append(Stuck(vm, tuple(reasons)))
    plan.moves.sort(key=lambda m: (m.vm.source, m.vm.name))
    return plan


def retarget(
    plan: EvacuationPlan, vm_uuid: str, target: str, hosts: Mapping[str, Capacity]
) -> Reason | None:
    """Change one VM's target among its allowed hosts; returns why not, or None when done."""
    for i, move in enumerate(plan.moves):
        if move.vm.uuid != vm_uuid:
            continue
        if target not in move.vm.allowed:
            return Reason("plan.not_allowed", f"{move.vm.name} may not run on {target}.",
                          "Pick a host from the VM's allowed set.")
        host = hosts.get(target)
        if host is None:
            return Reason("plan.unknown_host", f"There is no host called {target}.")
        used_mem, used_cpu = plan.load().get(target, (0, 0))
        if move.target == target:  # its own share is already counted there
            used_mem, used_cpu = used_mem - move.vm.memory_mib, used_cpu - move.vm.vcpus
        if (host.free_memory_mib - used_mem < move.vm.memory_mib
                or host.free_vcpus - used_cpu < move.vm.vcpus):
            return _no_room(replace(host, free_memory_mib=host.free_memory_mib - used_mem,
                                    free_vcpus=host.free_vcpus - used_cpu), move.vm)
        plan.moves[i] = Move(move.vm, target)
        return None
    return Reason("plan.unknown_vm", f"No VM with UUID {vm_uuid} is in this plan.")


def drop(plan: EvacuationPlan, vm_uuid: str) -> bool:
    """Remove a VM from the plan (the admin decided to leave it); True if it was there."""
    for i, move in enumerate(plan.moves):
        if move.vm.uuid == vm_uuid:
            plan.dropped.append(plan.moves.pop(i).vm)
            return True
    return False
