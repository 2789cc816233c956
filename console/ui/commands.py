"""Command palette (ctrl+p): every action, plus "go to VM …" and "go to host …".

With 10,000 VMs the fuzzy matcher is the slow part, so candidates are first narrowed
with a plain substring test on precomputed lowercase names.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from console.ui.app import EscortApp

MAX_HITS = 40


class EscortCommands(Provider):
    def _actions(self) -> list[tuple[str, str, Callable[[], object]]]:
        app = cast("EscortApp", self.app)
        items: list[tuple[str, str, Callable[[], object]]] = [
            ("Show trust (CA tree)", "the CA tree with status", partial(app.switch_mode, "trust")),
            ("Show hosts", "hosts table", partial(app.switch_mode, "hosts")),
            ("Show VMs", "VMs and their allowed targets", partial(app.switch_mode, "vms")),
            ("Show migrations", "live progress, abort, half-done migrations",
             partial(app.switch_mode, "migrations")),
            ("Evacuate the selected host", "plan every VM off it; edit; run (Hosts tab)",
             partial(app.run_action, "screen.evacuate")),
            ("Show problems", "load problems, hosts, guards, misplaced VMs", app.action_problems),
            ("Show radar", "what expires when and what breaks then (R)", app.action_radar),
            ("Help: keys", "every key as currently mapped", app.action_help),
            ("Copy last error", "OSC 52 clipboard", app.action_copy_error),
            ("Filter this table", "as you type", partial(app.run_action, "screen.filter")),
            ("Walkthrough of the selected VM and target", "step-by-step decision",
             partial(app.run_action, "screen.walkthrough")),
        ]
        keys = app.admin_keys
        for admin in app.admin_ids():
            why = (keys or {}).get(admin, "")
            if why:  # offered only with the admin's key present; the entry says why not
                items.append((f"Act as admin {admin}: key not present", why, partial(app.act_as, admin)))
            else:
                items.append((f"Act as admin {admin}", "targets and walkthroughs count their grants"
                              + ("" if keys is not None else " (keys still being checked)"),
                              partial(app.act_as, admin)))
        if app.admin:
            items.append(("Act as no admin", "owners' policies only", partial(app.act_as, None)))
        if not app.readonly:
            items.append(("Migrate the selected VM to the selected target", "asks first",
                          partial(app.run_action, "screen.migrate")))
        return items

    def _why(self, query: str, app: EscortApp) -> list[Hit]:
        """`why VM HOST`: one hit per matching (VM, host) pair; Enter opens the walkthrough.

        Both words are matched as substrings (case-insensitive), so `why db par` finds
        db-1 -> par-1; a missing host word lists the VM's refused hosts first.
        """
        words = query.strip().split()[1:]
        vm_word = words[0].lower() if words else ""
        host_word = words[1].lower() if len(words) > 1 else ""
        vms = [v for v in app.all_vms() if not vm_word or vm_word in v.name.lower() or vm_word in v.uuid]
        exact = [v for v in vms if v.name.lower() == vm_word]
        vms = exact or vms
        hosts = [h.name for h in app.all_hosts() if not host_word or host_word in h.name.lower()]
        exact_h = [h for h in hosts if h.lower() == host_word]
        hosts = exact_h or hosts
        hits: list[Hit] = []
        for vm in vms[:MAX_HITS]:
            allowed = set(vm.allowed_targets)
            ordered = sorted(hosts, key=lambda h: (h in allowed, h))
            for host in ordered:
                verdict = "allowed" if host in allowed else (
                    "runs there" if host == vm.host else "refused")
                text = f"Why can't {vm.name} go to {host}? ({verdict})"
                score = 1.0 if (exact and exact_h) else 0.9 - 0.01 * len(hits) / MAX_HITS
                hits.append(Hit(score, text, partial(app.open_why, vm.uuid, host),
                                help="the step-by-step decision (same code as escort explain)"))
                if len(hits) >= MAX_HITS:
                    return hits
        return hits

    async def discover(self) -> Hits:
        for title, help_text, callback in self._actions():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        app = cast("EscortApp", self.app)
        matcher = self.matcher(query)
        for title, help_text, callback in self._actions():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
        if query.lower().lstrip().startswith("why"):
            for hit in self._why(query, app):
                yield hit
            return
        needle = query.lower().strip()
        for word in ("go to", "goto", "vm", "host"):
            if needle.startswith(word):
                needle = needle[len(word):].strip()
        hits = 0
        for vm in app.all_vms():
            if needle and needle not in vm.name.lower() and needle not in vm.uuid:
                continue
            text = f"Go to VM {vm.name}"
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), partial(app.go_to_vm, vm.uuid),
                          help=f"on {vm.host or '?'}, owner {vm.owner or '?'}")
                hits += 1
                if hits >= MAX_HITS:
                    break
        hits = 0
        for host in app.all_hosts():
            if needle and needle not in host.name.lower():
                continue
            text = f"Go to host {host.name}"
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), partial(app.go_to_host, host.name),
                          help=f"region {host.spec.region or '?'}")
                hits += 1
                if hits >= MAX_HITS:
                    break
