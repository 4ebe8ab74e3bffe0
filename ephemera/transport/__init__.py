"""Reaching a machine: the Remote contract, SSH (connections, host keys, commands, files, tunnels), containers on a machine's Docker."""
