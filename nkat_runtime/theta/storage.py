"""The auto-optimiser's study storage: an Optuna RDB storage from a URL as a user types it.

SQLite (one machine), PostgreSQL or MySQL (a study shared by workers on several machines).
A URL without a driver gets the one NKAT documents: ``postgresql://`` (and ``postgres://``)
means psycopg 3 (``pip install 'nkat[postgres]'``), ``mysql://`` means PyMySQL
(``pip install pymysql``); name another driver to use it (``postgresql+psycopg2://``).
Errors reach the user as one line, never with the password.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from typing import Iterator

from ..errors import NKATError
from .report import mask_url

log = logging.getLogger(__name__)

DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "mysql": "mysql+pymysql"}
INSTALL_HINTS = {"psycopg": "pip install 'nkat[postgres]'", "psycopg2": "pip install psycopg2-binary",
                 "pymysql": "pip install pymysql", "MySQLdb": "pip install mysqlclient"}
HEARTBEAT_S = 10  # a running trial's heartbeat (--heartbeat)
GRACE_FACTOR = 3  # a running trial silent for GRACE_FACTOR heartbeats is taken for a dead worker's
CONNECT_TIMEOUT_S = 10
CREATE_ATTEMPTS = 5  # workers starting together on an empty database race to create its tables
MAX_RETRIES = 2  # a trial whose worker died is rerun at most this often (a setting that kills workers stops)


class StorageError(NKATError):
    """The study storage cannot be opened or used."""


def normalise_url(url: str) -> str:
    """``postgresql://…`` → ``postgresql+psycopg://…``, ``mysql://…`` → ``mysql+pymysql://…``; others as
    given."""
    m = re.match(r"([A-Za-z0-9_]+)://", url)
    if m and m.group(1).lower() in DEFAULT_DRIVERS:
        return DEFAULT_DRIVERS[m.group(1).lower()] + url[m.end(1):]
    return url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {}
    kwargs: dict = {"pool_pre_ping": True}  # a connection the server dropped during a long trial is replaced
    if url.startswith("postgresql+psycopg") and "connect_timeout" not in url:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}  # an unreachable host fails, not hangs
    return kwargs


def _password(url: str) -> str | None:
    m = re.match(r"[^:]+://[^:/@]+:([^@]*)@", url)
    return m.group(1) if m and m.group(1) else None


def describe(exc: BaseException, url: str) -> str:
    """One line saying what went wrong with the storage at ``url``, without its password."""
    import sqlalchemy.exc

    orig = getattr(exc, "orig", None) if isinstance(exc, sqlalchemy.exc.DBAPIError) else None
    text = " ".join(line.strip() for line in str(orig or exc).splitlines() if line.strip())
    text = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", text)
    secret = _password(url)
    if secret:
        text = text.replace(secret, "***")
    return f"study storage {mask_url(url)}: {text}"


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Database errors inside become a :class:`StorageError` of one line."""
    import sqlalchemy.exc

    try:
        yield
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StorageError(describe(exc, url)) from None


def open_storage(url: str, heartbeat_s: int, grace_s: int):
    """Optuna's RDBStorage at ``url`` with a heartbeat: a running trial whose worker stopped beating
    for ``grace_s`` is failed by the next worker that looks, and rerun (same parameters) up to
    :data:`MAX_RETRIES` times."""
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    retry_kw = "heartbeat_stale_trial_callback"
    if retry_cls is None:  # optuna < 4.9
        retry_cls, retry_kw = optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"
    url = normalise_url(url)
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=heartbeat_s,
                                  grace_period=grace_s, **{retry_kw: retry_cls(max_retry=MAX_RETRIES)})
        except ImportError as exc:
            missing = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None)
            hint = f" ({INSTALL_HINTS[missing]})" if missing in INSTALL_HINTS else ""
            raise StorageError(f"study storage {mask_url(url)}: its database driver "
                               f"{missing or '?'} is not installed{hint}") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            if attempt == CREATE_ATTEMPTS:
                raise StorageError(describe(exc, url)) from None
            log.debug("creating the study tables raced another worker (%s); again", type(exc).__name__)
            time.sleep(0.2 * attempt)
        except (sqlalchemy.exc.ArgumentError, ValueError) as exc:  # not a URL SQLAlchemy can parse
            raise StorageError(f"{describe(exc, url)} (a SQLAlchemy database URL such as "
                               "sqlite:///optuna.db or postgresql://user:password@host/database)") from None
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise StorageError(describe(exc, url)) from None
    raise AssertionError("not reached")
