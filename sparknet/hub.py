"""Is the Hugging Face hub usable from here? The one place that answers it: the offline flags and a bounded probe.

Why a probe at all: with the hub unreachable but HF_HUB_OFFLINE unset, huggingface_hub and `datasets` retry every
request with backoff (25-45 s per file or dataset); knowing it up front lets a load go straight to the local cache
and a check fail in seconds.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

_TRUE = {"1", "ON", "YES", "TRUE"}
_PROBES: dict[str, str] = {}  # endpoint -> the probe's answer, once per process


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, as set now or as huggingface_hub read them when it was imported (its
    constants may differ from os.environ now)."""
    flags = [os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", "")]
    if any(f.strip().upper() in _TRUE for f in flags):
        return True
    constants = sys.modules.get("huggingface_hub.constants")  # only if imported: importing it would read the flags
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_unreachable(timeout_s: float = 4.0) -> str:
    """"" when the hub answers an HTTP request within `timeout_s` seconds (all of it, name lookup included), else
    why not ("HF_HUB_OFFLINE=1" when a flag says so). Asked once per process and endpoint.

    An HTTP answer, not a TCP connection, is the test: a sandbox or firewall may accept every connection and never
    answer. Any status counts (even 404): the server is there. The request runs in a daemon thread that is given
    up on after the timeout, because no socket timeout bounds the name lookup (a dead resolver can take 20 s);
    proxies are honoured (urllib reads HTTPS_PROXY)."""
    if hub_offline():
        return "HF_HUB_OFFLINE=1"
    url = endpoint()
    if url not in _PROBES:
        import urllib.error
        import urllib.request

        outcome: list[str] = []

        def probe() -> None:
            try:
                urllib.request.urlopen(urllib.request.Request(url + "/api/models/openai-community/gpt2",
                                                              method="HEAD"), timeout=timeout_s).close()
                outcome.append("")
            except urllib.error.HTTPError:  # an answer, if not a 200
                outcome.append("")
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                outcome.append(f"{url} did not answer: {getattr(reason, 'strerror', None) or reason}")

        worker = threading.Thread(target=probe, daemon=True)  # daemon: a hung lookup must not hold the exit
        worker.start()
        worker.join(timeout_s)
        _PROBES[url] = outcome[0] if outcome else f"{url} did not answer within {timeout_s:g} s"
    return _PROBES[url]


@contextlib.contextmanager
def offline(on: bool = True) -> Iterator[None]:
    """huggingface_hub's offline switch for the duration of one load: transformers reads it at call time, so a
    model in the local HF cache still loads and a missing one fails at once instead of after retries."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
