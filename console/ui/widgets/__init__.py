"""Reusable widgets: the virtual table, detail panes, dialogs."""
