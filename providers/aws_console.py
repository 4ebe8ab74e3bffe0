"""The instance's SSH host keys, read from its console output before the first login.

Cloud-init prints the host's public keys to the serial console at boot, between
``-----BEGIN SSH HOST KEY KEYS-----`` and ``-----END SSH HOST KEY KEYS-----``. The console
output comes through the EC2 API (signed, over TLS), so keys read from it can be pinned
before SSH is first used: a machine in the middle cannot present its own key. Until
the keys show up (the console output lags the boot by up to a few minutes), the
instance is not ready; after ``aws_host_key_wait`` seconds from launch the run goes on
and known_hosts or first-use trust decide (see :mod:`ephemera.transport.hostkeys`).

A mixin of :class:`ephemera_providers.aws.AWSProvider`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from ephemera.provider import Instance
from ephemera.transport.hostkeys import keys_from_console

log = logging.getLogger(__name__)

MAX_CONSOLE_CHARS = 512 * 1024


class ConsoleHostKeys:
    """``_console_host_keys``: what the console output says; ``_host_key_wait_over``."""

    settings: Any

    def _console_host_keys(self, region: str, instance_id: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._call_raw(  # type: ignore[attr-defined]
                "ec2", region, "get_console_output", InstanceId=instance_id)
        except (ClientError, BotoCoreError) as exc:
            log.debug("no console output for %s yet: %s", instance_id, exc)
            return []
        output = answer.get("Output") if isinstance(answer, dict) else None
        if not isinstance(output, str):
            return []
        return keys_from_console(output[-MAX_CONSOLE_CHARS:])

    def _host_key_wait_over(self, instance: Instance) -> bool:
        launched = instance.launched_at
        if launched is None:
            return True
        waited = (datetime.now(UTC) - launched).total_seconds()
        return waited >= float(self.settings.aws_host_key_wait)
