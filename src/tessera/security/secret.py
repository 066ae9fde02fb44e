"""The service secret: from TESSERA_SECRET_KEY, or generated once into the data folder (0600)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tessera.config import Settings

SECRET_FILE = "secret.key"  # noqa: S105 (a file name)


def load_or_create_secret(settings: Settings) -> bytes:
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = Path(settings.data_dir) / SECRET_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: of two instances starting at once, exactly one writes the secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if len(value) < 32:
            raise RuntimeError(f"{path} holds no usable secret; delete it to regenerate") from None
        return value.encode()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(48))
    os.chmod(path, 0o600)
    return path.read_text().strip().encode()
