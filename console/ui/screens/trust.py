"""Trust: the CA tree with status glyph + word, and the selected certificate's facts."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Tree

from console.core.pki import CANode
from console.ui.screens.base import FleetScreen
from console.ui.text import ca_status, cert_lines, crl_words, plural
from console.ui.widgets.detail import DetailPane


@dataclass(frozen=True)
class _HostLeaf:
    name: str


class TrustScreen(FleetScreen):
    """Why a tree: trust flows root → intermediate → host, and revoking a node cuts
    everything under it — the shape *is* the explanation."""
    screen_label = "Trust"

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        with Horizontal(classes="split"):
            tree: Tree[CANode | _HostLeaf | None] = Tree("Trust anchors", id="ca-tree")
            tree.show_root = False
            tree.guide_depth = 3
            yield tree
            yield DetailPane(id="detail")
        yield from self.compose_bottom()

    def on_mount(self) -> None:
        self._fill()
        self.query_one("#ca-tree", Tree).focus()

    def reload(self) -> None:
        tree = self.query_one("#ca-tree", Tree)
        current = tree.cursor_node.data if tree.cursor_node is not None else None
        self._fill()
        if isinstance(current, CANode):
            self.focus_ca(current.info.fingerprint)

    def _fill(self) -> None:
        tree = self.query_one("#ca-tree", Tree)
        tree.clear()
        service = self.escort.service
        store = service.trust
        at = self.escort.at
        tones = self.escort.tones()
        if store is None or not store.anchors:
            tree.root.add_leaf(Text("✗ no trusted CA loaded", style="bold"), None)
            self.query_one(DetailPane).show(
                "No certificate authority could be loaded for this fleet, so no host can be"
                " trusted.\nPress p to see why (the fleet file or trust directory).")
            return
        leaves: dict[str, list[str]] = {}
        for host in service.hosts():
            if host.chain is not None and len(host.chain.chain) > 1:
                leaves.setdefault(host.chain.chain[1].fingerprint, []).append(host.name)

        def host_label(name: str) -> Text:
            host = self.escort.host_by_name(name)
            chain = host.chain if host is not None else None
            if chain is None or chain.valid:
                return Text.assemble(("host ", "dim"), name)
            code = chain.reasons[0].code if chain.reasons else "invalid"
            word = {"cert.revoked": "revoked", "cert.expired": "expired",
                    "ca.revoked": "CA revoked", "revocation.stale": "revocation unknown",
                    "revocation.missing": "revocation unknown",
                    "revocation.unusable": "revocation unknown"}.get(code, code)
            glyph = "⊘" if "revoked" in word else "✗"
            return Text.assemble(("host ", "dim"), name, "  ", (f"{glyph} {word}", tones["bad"]))

        def add(parent: object, node: CANode) -> None:
            glyph, word, tone = ca_status(node, at)
            crl_label, _, crl_tone = crl_words(node, at)
            label = Text.assemble((f"{glyph} ", tones[tone]), node.info.name, "  ",
                                  (word, tones[tone]), "  ", (crl_label, tones[crl_tone]))
            branch = parent.add(label, node, expand=True)  # type: ignore[attr-defined]
            for child in sorted(node.children, key=lambda c: c.info.name):
                add(branch, child)
            for host_name in sorted(leaves.get(node.info.fingerprint, [])):
                branch.add_leaf(host_label(host_name), _HostLeaf(host_name))

        for anchor in sorted(store.anchors, key=lambda a: a.info.name):
            add(tree.root, anchor)
        tree.root.expand()
        tree.move_cursor(tree.root.children[0] if tree.root.children else None)
        if tree.root.children:
            self._show(tree.root.children[0].data)

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted[CANode | _HostLeaf | None]) -> None:
        self._show(event.node.data)

    def _show(self, data: CANode | _HostLeaf | None) -> None:
        pane = self.query_one(DetailPane)
        if isinstance(data, _HostLeaf):
            self.escort.show_host_detail(pane, data.name)
            return
        if data is None:
            return
        at = self.escort.at
        glyph, word, _ = ca_status(data, at)
        lines = [f"{glyph} {data.info.name} — {word}"]
        if data.revoked:
            why = f" ({data.revocation_reason})" if data.revocation_reason else ""
            lines.append(f"Revoked by its issuer's CRL{why}: nothing under it is trusted.")
        lines.append(crl_words(data, at)[1])
        lines.append("")
        lines += cert_lines(data.info, at, self.escort.policy_names())
        n_hosts, n_vms = self.escort.service.dependants(data.info.fingerprint)
        lines += ["", f"Depends on it  {plural(n_hosts, 'host')}, {plural(n_vms, 'VM')} "
                      "(hosts chained under it; VMs whose policy trusts it)"]
        if data.info.source:
            lines.append(f"File         {self.escort.display_path(data.info.source)}")
        pane.show("\n".join(lines))

    def focus_ca(self, fingerprint: str) -> bool:
        tree = self.query_one("#ca-tree", Tree)
        stack = list(tree.root.children)
        while stack:
            node = stack.pop()
            if isinstance(node.data, CANode) and node.data.info.fingerprint == fingerprint:
                tree.move_cursor(node)
                return True
            stack.extend(node.children)
        return False
