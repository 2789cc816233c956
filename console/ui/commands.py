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
            ("Show problems", "everything that failed to load", app.action_problems),
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
