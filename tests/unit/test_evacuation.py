"""The evacuation planner on small hand-made and large generated fleets."""

from __future__ import annotations

import random

from console.core.evacuation import (
    Capacity,
    EvacuationPlan,
    Evacuee,
    drop,
    plan_evacuation,
    retarget,
)
from console.core.reasons import Reason


def vm(name: str, allowed: set[str], mem: int = 1024, cpu: int = 1, region: str = "eu") -> Evacuee:
    return Evacuee(uuid=f"uuid-{name}", name=name, source="src", region=region, memory_mib=mem,
                   vcpus=cpu, owner=f"owner-of-{name}", allowed=frozenset(allowed))


def refused(_vm: Evacuee, host: str) -> tuple[Reason, ...]:
    return (Reason("policy.ca_untrusted", f"{host} is under a CA the policy does not trust."),)


def check_capacity(plan: EvacuationPlan, hosts: list[Capacity]) -> None:
    by_name = {h.name: h for h in hosts}
    for target, (mem, cpu) in plan.load().items():
        assert mem <= by_name[target].free_memory_mib
        assert cpu <= by_name[target].free_vcpus


def test_constrained_vm_gets_the_only_slot_it_can_use() -> None:
    hosts = [Capacity("a", "eu", 1024, 4), Capacity("b", "eu", 1024, 4)]
    flexible = vm("flexible", {"a", "b"})
    picky = vm("picky", {"a"})
    plan = plan_evacuation([flexible, picky], hosts, refused, sources=["src"])
    assert {m.vm.name: m.target for m in plan.moves} == {"picky": "a", "flexible": "b"}
    assert plan.stuck == []


def test_stuck_vm_lists_every_candidate_with_reason_and_owner() -> None:
    hosts = [Capacity("a", "eu", 512, 4), Capacity("b", "us", 8192, 8)]
    big = vm("big", {"a"}, mem=1024)
    plan = plan_evacuation([big], hosts, refused, sources=["src"])
    assert plan.moves == []
    (stuck,) = plan.stuck
    assert stuck.owner_to_contact == "owner-of-big"
    reasons = dict(stuck.why_not)
    assert reasons["a"][0].code == "capacity.full"
    assert "512 MiB free" in reasons["a"][0].message
    assert reasons["b"][0].code == "policy.ca_untrusted"


def test_source_hosts_are_never_targets() -> None:
    hosts = [Capacity("src", "eu", 99999, 99), Capacity("a", "eu", 2048, 2)]
    plan = plan_evacuation([vm("x", {"src", "a"})], hosts, refused, sources=["src"])
    assert [m.target for m in plan.moves] == ["a"]


def test_same_region_preferred_then_most_free() -> None:
    hosts = [Capacity("far", "us", 100000, 64), Capacity("near1", "eu", 4096, 4),
             Capacity("near2", "eu", 8192, 4)]
    plan = plan_evacuation([vm("x", {"far", "near1", "near2"})], hosts, refused)
    assert plan.moves[0].target == "near2"


def test_capacity_consumed_by_earlier_moves() -> None:
    hosts = [Capacity("a", "eu", 2048, 8), Capacity("b", "us", 2048, 8)]
    vms = [vm(f"v{i}", {"a", "b"}) for i in range(5)]
    plan = plan_evacuation(vms, hosts, refused)
    assert len(plan.moves) == 4
    assert len(plan.stuck) == 1
    check_capacity(plan, hosts)


def test_retarget_and_drop() -> None:
    hosts = [Capacity("a", "eu", 2048, 2), Capacity("b", "eu", 1024, 1)]
    x, y = vm("x", {"a", "b"}), vm("y", {"a"})
    plan = plan_evacuation([x, y], hosts, refused)
    by_name = {h.name: h for h in hosts}
    assert retarget(plan, "uuid-y", "b", by_name) is not None  # not allowed
    # y (only "a" allowed) went first to a; x to a as well (tie broken by name): 0 MiB left there.
    assert {m.vm.name: m.target for m in plan.moves} == {"x": "a", "y": "a"}
    assert retarget(plan, "uuid-x", "a", by_name) is None  # staying put always fits
    assert retarget(plan, "uuid-x", "b", by_name) is None
    assert retarget(plan, "uuid-y", "a", by_name) is None
    assert retarget(plan, "uuid-x", "zzz", by_name) is not None
    assert drop(plan, "uuid-x") and [v.name for v in plan.dropped] == ["x"]
    assert not drop(plan, "uuid-x")


def test_large_generated_fleet_respects_capacity_and_allowed_sets() -> None:
    rng = random.Random(7)
    hosts = [Capacity(f"h{i}", rng.choice(["eu", "us", "ap"]), rng.randint(0, 64) * 1024,
                      rng.randint(0, 32)) for i in range(300)]
    names = [h.name for h in hosts]
    vms = [vm(f"v{i}", set(rng.sample(names, rng.randint(0, 40))), mem=rng.choice([512, 1024, 4096]),
              cpu=rng.randint(1, 4), region=rng.choice(["eu", "us"])) for i in range(400)]
    plan = plan_evacuation(vms, hosts, refused)
    assert len(plan.moves) + len(plan.stuck) == len(vms)
    for move in plan.moves:
        assert move.target in move.vm.allowed
    check_capacity(plan, hosts)
    for stuck in plan.stuck:  # nothing allowed had room when it was its turn
        assert {h for h, _ in stuck.why_not} == set(names)
