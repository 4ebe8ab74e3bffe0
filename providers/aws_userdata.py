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

Given the job's image, it starts pulling it at boot (a transient systemd unit,
``ephemera-boot-pull``), so the pull runs while ephemera is still waiting for SSH. Its
log and exit status go to ``BOOT_DIR``. The image phase's own ``docker pull`` of the same
image then attaches to the layer downloads already in flight in dockerd (dockerd shares a
layer's transfer between pulls) or finds the image present; when the boot pull failed or
never ran, that pull simply does the work, so nothing depends on the boot pull.
"""

from __future__ import annotations

import shlex
from datetime import datetime

from ephemera.provider import format_time

DEADMAN_UNIT = "/etc/systemd/system/ephemera-deadman.service"
DEADMAN_SCRIPT = "/usr/local/sbin/ephemera-deadman"
BOOT_DIR = "/var/lib/ephemera"
# Transient unit names of what starts at boot.
BOOT_PULL_UNIT = "ephemera-boot-pull"


def boot_pull(image: str) -> str:
    """The user-data step that starts pulling ``image`` now, detached from cloud-init (a
    transient unit; ``nohup`` where systemd-run is missing). Writes ``BOOT_DIR``/pull.image,
    pull.log and, when done, pull.rc."""
    q = shlex.quote(image)
    pull = shlex.quote(f"docker pull {q} > {BOOT_DIR}/pull.log 2>&1; echo $? > {BOOT_DIR}/pull.rc")
    return f"""
# 5. Start pulling the job's image now; ephemera's own pull joins it or finds it done.
mkdir -p {BOOT_DIR}
printf '%s\\n' {q} > {BOOT_DIR}/pull.image
systemd-run --unit {BOOT_PULL_UNIT} --no-block -p After=docker.service sh -c {pull} \\
    || nohup sh -c {pull} >/dev/null 2>&1 &
"""


def user_data(run_id: str, expires_at: datetime, login_user: str = "ubuntu",
              image: str | None = None) -> str:
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
cat > {DEADMAN_SCRIPT} <<EOF
#!/bin/sh
while [ "\\$(date +%s)" -lt $EXPIRES_AT ]; do sleep 20; done
shutdown -h now "ephemera: run {run_id} expired" || systemctl poweroff
EOF
chmod 0755 {DEADMAN_SCRIPT}
cat > {DEADMAN_UNIT} <<EOF
[Unit]
Description=ephemera dead-man switch (power off at {stamp})

[Service]
ExecStart={DEADMAN_SCRIPT}
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
""" + (boot_pull(image) if image and image != "host" else "")
