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

Then the boot work (everything below ``BOOT_WORK_MARK``): given the job's image, it starts
pulling it (a transient systemd unit, ``ephemera-boot-pull``), and given a hub model that
needs no token (``boot_weights``), it starts downloading the weights as the login user
into the hub cache the run will mount (``ephemera-boot-weights``), the same download the
weights phase runs over SSH (``ephemera.lifecycle.weights.host_command``). Both run while
ephemera is still waiting for SSH. cloud-init runs the user-data before it prints the host
keys to the console, which ephemera waits for, so by the time ephemera logs in both have
started. Each task writes what it was asked for (``want``), its ``pid``, ``log`` and, when
done, its exit status (``rc``) to a directory of its own under the boot directory
(``BOOT_DIR`` unless the ``aws_boot_dir`` setting says otherwise; the provider declares it
as ``Capabilities.boot_dir``). The image phase and the weights phase find them there and
wait for them instead of starting again; when a task failed or never ran, they do the work
themselves, so nothing depends on the boot work.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping
from datetime import datetime

from ephemera.lifecycle.weights import host_command, hub_venv
from ephemera.provider import format_time

DEADMAN_UNIT = "/etc/systemd/system/ephemera-deadman.service"
DEADMAN_SCRIPT = "/usr/local/sbin/ephemera-deadman"
BOOT_DIR = "/var/lib/ephemera"
# Transient unit names of what starts at boot.
BOOT_PULL_UNIT = "ephemera-boot-pull"
BOOT_WEIGHTS_UNIT = "ephemera-boot-weights"
# The line the boot work starts after (tests play the boot by running what follows it).
BOOT_WORK_MARK = "# ephemera: boot work"


def boot_home(cache: str, boot_dir: str, workroot: str) -> str:
    """The hub cache a boot download goes to, where the run's weights phase will look for
    it: a directory of the run's own under ``boot_dir``, the runs' shared one beside the
    run directories (``auto``), or the job's own directory."""
    if not cache:
        return f"{boot_dir}/hf"
    if cache == "auto":
        return posixpath.join(workroot, ".cache", "hf")
    return cache


def _task(boot_dir: str, name: str, unit: str, want: list[str], command: str, *,
          after: str, as_user: str | None = None, env: dict[str, str] | None = None) -> str:
    """Lines that record ``want`` in ``<boot_dir>/<name>`` and start ``command`` detached
    (a transient unit; ``nohup`` where systemd-run is missing) with its pid, log and exit
    status beside it; as ``as_user`` (who then owns the directory) when given."""
    q = shlex.quote(f"{boot_dir}/{name}")
    wrapper = (f"echo $$ > {q}/pid; ( {command} ) > {q}/log 2>&1; "
               f"echo $? > {q}/rc.new; mv {q}/rc.new {q}/rc")
    lines = [f"mkdir -p {q}", f"printf '%s\\n' {' '.join(shlex.quote(w) for w in want)} > {q}/want",
             f"{name}_task={shlex.quote(wrapper)}"]
    start = f'sh -c "${name}_task"'
    if as_user:
        user = shlex.quote(as_user)
        lines.append(f"chown {user} {q}")
        values = "".join(f" {k}={shlex.quote(v)}" for k, v in (env or {}).items())
        start = f'runuser -u {user} -- env HOME="$(getent passwd {user} | cut -d: -f6)"{values} {start}'
    lines.append(f"systemd-run --unit {unit} --no-block -p After={after} {start} \\\n"
                 f"    || nohup {start} >/dev/null 2>&1 &")
    return "\n".join(lines) + "\n"


def boot_pull(image: str, boot_dir: str = BOOT_DIR) -> str:
    """The user-data step that starts pulling ``image`` now, detached from cloud-init."""
    q = shlex.quote(image)
    return ("\n# 5. Start pulling the job's image now; the image phase waits for it.\n"
            + _task(boot_dir, "pull", BOOT_PULL_UNIT, [image], f"docker pull {q}",
                    after="docker.service"))


def boot_weights(request: Mapping[str, str], login_user: str, python: str, boot_dir: str,
                 workroot: str) -> str:
    """The user-data step that starts downloading a hub model's weights now (``request``:
    repo, revision, cache as the job names it, endpoint), as the login user."""
    cache = request.get("cache", "")
    home = boot_home(cache, boot_dir, workroot)
    command = host_command(python, home, hub_venv(home, owned=not cache),
                           request["repo"], request.get("revision", ""))
    env = {"HF_ENDPOINT": request["endpoint"]} if request.get("endpoint") else {}
    own = "" if cache else f"mkdir -p {shlex.quote(home)} && chown {shlex.quote(login_user)} {shlex.quote(home)}\n"
    return ("\n# 6. Start downloading the model's weights (no token needed) into the hub cache the\n"
            "#    run mounts; the weights phase waits for it.\n" + own
            + _task(boot_dir, "weights", BOOT_WEIGHTS_UNIT,
                    [request["repo"], request.get("revision", ""), home], command,
                    after="network-online.target", as_user=login_user, env=env))


def user_data(run_id: str, expires_at: datetime, login_user: str = "ubuntu",
              image: str | None = None, *, boot_dir: str = BOOT_DIR, weights: str = "") -> str:
    """The whole script; ``weights`` is :func:`boot_weights`'s step, when there is one."""
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

{BOOT_WORK_MARK}
mkdir -p {shlex.quote(boot_dir)}
""" + (boot_pull(image, boot_dir) if image and image != "host" else "") + weights
