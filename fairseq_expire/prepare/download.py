"""Downloads that survive dead mirrors and broken connections: resumable, verified, and atomic.

A URL may be ``http(s)://``, ``file://`` or a local path, so that the same code serves the real mirrors and a
copy on disk (tests, machines without internet). Only the standard library is used.
"""

import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from .output import PrepareError, file_md5

logger = logging.getLogger(__name__)

USER_AGENT = "fairseq-expire-prepare/0.1 (python urllib)"
CHUNK_BYTES = 1 << 20
# A transfer that broke after making progress is resumed this many times before the next mirror is tried.
RESUMES = 5


class DownloadError(PrepareError):
    """No mirror gave the file; ``failures`` says why for each URL."""

    def __init__(self, message: str, failures: Sequence[str] = ()):
        super().__init__(message)
        self.failures = list(failures)


def as_url(location: str) -> str:
    """A URL for ``location``: URLs unchanged, local paths as ``file://`` URLs."""
    if urllib.parse.urlparse(location).scheme in ("http", "https", "file"):
        return location
    return Path(location).resolve().as_uri()


def url_to_path(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))


def open_url(url: str, offset: int = 0, timeout: float = 60):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


class _Truncated(OSError):
    """The connection ended before the announced size arrived."""


def _transfer(url: str, partial: Path, timeout: float) -> None:
    """Download ``url`` into ``partial``, continuing after the bytes already there when the server allows it."""
    if urllib.parse.urlparse(url).scheme == "file":
        shutil.copyfile(url_to_path(url), partial)
        return
    have = partial.stat().st_size if partial.exists() else 0
    try:
        response = open_url(url, have, timeout)
    except urllib.error.HTTPError as error:
        # 416: nothing left after our offset; the part may be whole, the MD5 check decides
        if error.code == 416 and have:
            return
        raise
    with response:
        resumed = response.status == 206
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected is not None else None
        received = 0
        with open(partial, "ab" if resumed else "wb") as handle:
            if resumed:
                logger.info(f"resuming {url} after {have:,} bytes")
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                handle.write(chunk)
                received += len(chunk)
        if expected is not None and received < expected:
            raise _Truncated(f"connection closed after {received:,} of {expected:,} bytes")


def _download(url: str, partial: Path, md5: Optional[str], timeout: float) -> Optional[str]:
    """Download ``url`` into ``partial`` (resuming after breaks); None when it is complete and verified, else why
    not."""
    # a part left by an earlier run is resumed, but downloaded from scratch if the result is wrong
    stale = partial.exists()
    attempt = 0
    while True:
        before = partial.stat().st_size if partial.exists() else 0
        try:
            _transfer(url, partial, timeout)
        except (OSError, urllib.error.URLError) as error:  # HTTPError, timeouts and resets are OSErrors too
            attempt += 1
            if partial.exists() and partial.stat().st_size > before and attempt <= RESUMES:
                logger.warning(f"{url}: {error}; resuming")
                continue
            return str(error)
        got = file_md5(partial) if md5 is not None else None
        if got is None or got == md5:
            return None
        partial.unlink()
        if not stale:
            return f"MD5 {got}, expected {md5}"
        logger.warning(f"{url}: the resumed download has the wrong MD5: downloading it from the start")
        stale = False


def fetch(
    urls: Sequence[str],
    destination: Path,
    md5: Optional[str] = None,
    timeout: float = 60,
    verbose: bool = True,
) -> Path:
    """``destination``, downloaded from the first of ``urls`` that gives it (with the given MD5, when known).

    An existing ``destination`` with the right MD5 is kept. The download goes to ``destination.part`` and is
    renamed only when complete and verified; a ``.part`` left by an interrupted run is resumed (HTTP Range).
    ``verbose=False`` logs only problems (for many small files).
    """
    log = logger.info if verbose else logger.debug
    destination = Path(destination)
    if destination.exists():
        if md5 is None or file_md5(destination) == md5:
            log(f"using {destination} (already downloaded)")
            return destination
        logger.warning(f"{destination} has the wrong MD5: downloading it again")
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    failures = []
    for url in map(as_url, urls):
        log(f"downloading {url} to {destination}")
        started = time.time()
        failure = _download(url, partial, md5, timeout)
        if failure is None:
            os.replace(partial, destination)
            size = destination.stat().st_size
            log(f"downloaded {destination} ({size:,} bytes, {time.time() - started:.0f} s)")
            return destination
        failures.append(f"{url}: {failure}")
        if md5 is None:  # unverifiable: never continue another mirror's bytes
            partial.unlink(missing_ok=True)
    raise DownloadError(
        f"could not download {destination.name}:\n  "
        + "\n  ".join(failures)
        + f"\nDownload it yourself (from any of these URLs) to {destination} and run again",
        failures,
    )
