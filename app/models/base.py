"""Declarative base and id helpers."""

from __future__ import annotations

import secrets
import time

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def new_id(prefix: str) -> str:
    """An opaque public id such as `ftjob-3f9a…`."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
