"""The console's screens: trust, hosts, VMs, walkthrough, migrations, help, problems."""
