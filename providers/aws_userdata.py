"""The user-data script an ephemera EC2 instance boots with.

Its main job is the dead-man switch: the instance powers itself off at the run's
``expires-at`` even if the machine that launched it has died, and because the
instance is launched with ``InstanceInitiatedShutdownBehavior=terminate``, an OS
shutdown ends in termination (and billing stops). ``halt`` would not count as a
shutdown for EC2, so the script uses ``shutdown -h``.

Two mechanisms, so that one failing does not leak the machine: ``shutdown -h +N``
scheduled as the very first step, and a systemd service that checks the clock
every 20 seconds and also survives a reboot.

It also puts the SSH login user (``ubuntu`` on the default AMI) in the ``docker``
group, which the AMI does not promise: the job's image runs through that Docker.
"""

from __future__ import annotations

import shlex
from datetime import datetime

from ephemera.provider import format_time


def user_data(run_id: str, expires_at: datetime, login_user: str = "ubuntu") -> str:
    epoch = int(expires_at.timestamp())
    stamp = format_time(expires_at)
    user = shlex.quote(login_user)
    return f"""#!/bin/bash
# ephemera run {run_id}: this instance powers off (and so terminates) at {stamp}.
set -u
EXPIRES_AT={epoch}

# 1. Dead-man switch, scheduled before anything else can fail.
now=$(date +%s)
minutes=$(( (EXPIRES_AT - now) / 60 ))
if [ "$minutes" -lt 1 ]; then
    shutdown -h now "ephemera: run {run_id} expired"
else
    shutdown -h +"$minutes" "ephemera: run {run_id} expires at {stamp}"
fi

# 2. The same deadline as a service, checked every 20 s and restarted on reboot.
cat > /usr/local/sbin/ephemera-deadman <<EOF
#!/bin/sh
while [ "\\$(date +%s)" -lt $EXPIRES_AT ]; do sleep 20; done
shutdown -h now "ephemera: run {run_id} expired" || systemctl poweroff
EOF
chmod 0755 /usr/local/sbin/ephemera-deadman
cat > /etc/systemd/system/ephemera-deadman.service <<EOF
[Unit]
Description=ephemera dead-man switch (power off at {stamp})

[Service]
ExecStart=/usr/local/sbin/ephemera-deadman
Restart=always

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable --now ephemera-deadman.service

# 3. The job's image runs through the VM's Docker with the NVIDIA runtime.
systemctl enable --now docker || service docker start || true

# 4. The login user reaches Docker through its group (new SSH sessions pick it up).
if id -u {user} >/dev/null 2>&1; then
    getent group docker >/dev/null || groupadd docker
    usermod -aG docker {user} || true
fi
"""
