"""What stopped a command, in one line that says what to do: never a traceback for a mistake.

A command lets whatever an adapter raises reach `cli.main`, which asks `explain` for the line,
prints it to stderr after the command's name and exits 2:

    Mistake            what the user typed is wrong (a file that does not open, a bad --url)
    KafkaException     Kafka cannot be reached, or refused (tail's UnknownTopic: a missing topic)
    S3Error, botocore  no credentials, an endpoint that does not answer, a missing bucket
    LocalStackError    a local server of `dev` is not installed or did not come up
    SiteFileMissing    a shipped file (unit, example config, Mosquitto config) is not installed
    OSError            a server a command talks to refused or timed out (simulate's broker),
                       or a path it was given cannot be used

Anything else is a bug: its traceback is the report. The lines name the option or config key
to check where the command has one (`--bootstrap`, `--url`, `[s3]` in `--config`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import botocore.exceptions
from confluent_kafka import KafkaError, KafkaException

from bridge.errors import describe
from bridge.sitefiles import SiteFileMissing


class Mistake(Exception):
    """What a user got wrong on the command line, said in one line that tells what to do."""


def explain(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The one line for `exc` met by the command `args` ran, or None for a bug."""
    for kind, line in _lines():
        if isinstance(exc, kind):
            return line(exc, args)
    return None


Explainer = Callable[[BaseException, argparse.Namespace], str | None]


def _lines() -> list[tuple[type[BaseException] | tuple[type[BaseException], ...], Explainer]]:
    """By class, first match wins. Imported here: boto3 costs every command a quarter
    second at start-up, and only a failing one needs it."""
    from bridge.devkit.localstack import LocalStackError
    from bridge.s3 import S3Error

    return [
        ((Mistake, LocalStackError, SiteFileMissing), _first_line),
        (KafkaException, _kafka),
        ((S3Error, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError), _s3),
        (OSError, _oserror),
    ]


_UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                KafkaError._RESOLVE}


def _kafka(exc: BaseException, args: argparse.Namespace) -> str:
    error = exc.args[0] if exc.args else None
    text = (error.str() if isinstance(error, KafkaError) else describe(exc)).strip()
    bootstrap = getattr(args, "bootstrap", None)
    where = f"Kafka at {bootstrap}" if bootstrap else "Kafka"
    check = " check --bootstrap" if bootstrap else ""
    known = getattr(exc, "known", None)
    if known is not None:
        topics = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "") or "none"
        topic = getattr(exc, "topic", "") or getattr(args, "topic", "")
        return f"{where} has no topic {topic!r}: check its name " \
               f"(topics there: {topics})"
    if isinstance(error, KafkaError) and error.code() in _UNREACHABLE:
        return f"cannot reach {where} ({text}): is it running?{check}"
    return f"{where} refused: {text}"


def _s3(exc: BaseException, args: argparse.Namespace) -> str:
    cause = exc.__cause__ or exc  # S3Error wraps what botocore raised
    text = describe(exc)
    config = getattr(args, "config", None)
    where = f" in {config}" if config else ""
    endpoint = "--s3-endpoint" if hasattr(args, "s3_endpoint") else f"[s3] endpoint_url{where}"
    if isinstance(cause, botocore.exceptions.NoCredentialsError |
                  botocore.exceptions.PartialCredentialsError):
        return f"no S3 credentials ({text}): set AWS_ACCESS_KEY_ID and " \
               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (boto3's chain)"
    if isinstance(cause, botocore.exceptions.ConnectionError):
        return f"cannot reach S3 ({text}): is it running? check {endpoint}"
    if isinstance(cause, botocore.exceptions.ClientError):
        code = cause.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return f"S3 has no such bucket ({text}): create it, or check [s3] bucket{where}"
        return f"S3 refused ({text}): check the credentials and what they may do on the bucket"
    return f"S3 failed ({text}): check [s3]{where} and the credentials"


def _oserror(exc: BaseException, args: argparse.Namespace) -> str | None:
    assert isinstance(exc, OSError)
    url = getattr(args, "url", None)
    if url is not None:  # refused, unreachable, TLS, no acks: said once, not per device
        return f"cannot publish to {url} ({describe(exc)}): is the broker running? check --url"
    if exc.filename is not None:
        return f"cannot use {exc.filename}: {exc.strerror or describe(exc)}"
    return None


def _first_line(exc: BaseException, args: argparse.Namespace) -> str:
    return describe(exc).splitlines()[0] if describe(exc) else type(exc).__name__

