"""Downloads (fairseq_expire.prepare.download) against a real local HTTP server: mirrors, resume, checksums.

``FakeServer`` (the stand-in for the dataset hosts) and ``run_script`` serve the other test_prepare_* files too.
"""

import base64
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
from console import ENV, REPO

from fairseq_expire.prepare.download import DownloadError, fetch


def run_script(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``python scripts/NAME ARGS`` as a user runs it (it imports the installed fairseq_expire)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *map(str, args)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


class FakeServer:
    """Serves the files under ``root`` over HTTP like a static host (``Range: bytes=N-`` answered with 206) and
    like Google Cloud Storage's JSON listing API (``/storage/v1/b/BUCKET/o?prefix=``, paginated, with base64
    MD5s). Switches make it misbehave: ``cut_after`` closes the next response after that many bytes,
    ``ignore_range`` answers every request in full, ``wrong_md5`` lists a wrong MD5 for those object names."""

    page_size = 3

    def __init__(self, root: Path):
        self.root = root
        self.requests = []  # (path, Range header or None)
        self.cut_after = None
        self.ignore_range = False
        self.wrong_md5 = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                server.requests.append((url.path, self.headers.get("Range")))
                if url.path.startswith("/storage/v1/b/"):
                    return self.listing(url)
                path = server.root / urllib.parse.unquote(url.path).lstrip("/")
                if not path.is_file():
                    return self.send_error(404)
                data = path.read_bytes()
                start = 0
                if self.headers.get("Range") and not server.ignore_range:
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    if start >= len(data):
                        return self.send_error(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_after is not None:
                    body, server.cut_after = body[: server.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)

            def listing(self, url):
                bucket = url.path.split("/")[4]
                query = urllib.parse.parse_qs(url.query)
                prefix = query["prefix"][0]
                names = sorted(
                    str(p.relative_to(server.root / bucket))
                    for p in (server.root / bucket / prefix).glob("*")
                    if p.is_file()
                )
                start = int(query.get("pageToken", ["0"])[0])
                page = {"kind": "storage#objects", "items": []}
                for name in names[start : start + server.page_size]:
                    data = (server.root / bucket / name).read_bytes()
                    digest = hashlib.md5(data + (b"x" if name in server.wrong_md5 else b"")).digest()
                    page["items"].append(
                        {"name": name, "size": str(len(data)), "md5Hash": base64.b64encode(digest).decode()}
                    )
                if start + server.page_size < len(names):
                    page["nextPageToken"] = str(start + server.page_size)
                body = json.dumps(page).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def file_requests(self):
        return [r for r in self.requests if not r[0].startswith("/storage/")]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    fake = FakeServer(root)
    yield fake
    fake.close()


@pytest.fixture
def payload(server):
    data = bytes(range(256)) * 4000  # ~1 MB: several read chunks
    (server.root / "data.bin").write_bytes(data)
    return data, hashlib.md5(data).hexdigest()


def test_download_verified_and_kept(server, payload, tmp_path):
    data, md5 = payload
    destination = tmp_path / "dl" / "data.bin"
    assert fetch([f"{server.url}/data.bin"], destination, md5) == destination
    assert destination.read_bytes() == data
    assert not destination.with_name("data.bin.part").exists()
    fetch([f"{server.url}/data.bin"], destination, md5)  # already there with the right MD5: no request
    assert len(server.file_requests()) == 1


def test_download_resumes_a_partial_file(server, payload, tmp_path):
    data, md5 = payload
    destination = tmp_path / "data.bin"
    destination.with_name("data.bin.part").write_bytes(data[:300_000])  # left by an interrupted run
    fetch([f"{server.url}/data.bin"], destination, md5)
    assert destination.read_bytes() == data
    assert server.file_requests() == [("/data.bin", "bytes=300000-")]


def test_download_resumes_after_a_broken_connection(server, payload, tmp_path):
    data, md5 = payload
    server.cut_after = 100_000
    destination = tmp_path / "data.bin"
    fetch([f"{server.url}/data.bin"], destination, md5)
    assert destination.read_bytes() == data
    assert server.file_requests() == [("/data.bin", None), ("/data.bin", "bytes=100000-")]


def test_download_restarts_when_the_server_ignores_range(server, payload, tmp_path):
    data, md5 = payload
    server.ignore_range = True
    destination = tmp_path / "data.bin"
    destination.with_name("data.bin.part").write_bytes(data[:1000])
    fetch([f"{server.url}/data.bin"], destination, md5)
    assert destination.read_bytes() == data


def test_a_wrong_partial_file_is_downloaded_again(server, payload, tmp_path):
    data, md5 = payload
    destination = tmp_path / "data.bin"
    destination.with_name("data.bin.part").write_bytes(b"garbage" * 1000)
    fetch([f"{server.url}/data.bin"], destination, md5)
    assert destination.read_bytes() == data
    assert server.file_requests()[-1] == ("/data.bin", None)


def test_mirrors_are_tried_in_turn(server, payload, tmp_path):
    data, md5 = payload
    urls = [f"{server.url}/missing.bin", str(tmp_path / "nowhere.bin"), f"{server.url}/data.bin"]
    fetch(urls, tmp_path / "data.bin", md5)
    assert (tmp_path / "data.bin").read_bytes() == data
    local = tmp_path / "copy.bin"
    local.write_bytes(data)
    # a local path is a mirror too
    fetch([f"{server.url}/missing.bin", str(local)], tmp_path / "from_path.bin", md5)
    assert (tmp_path / "from_path.bin").read_bytes() == data


def test_failures_name_every_mirror_and_leave_nothing(server, payload, tmp_path):
    data, _ = payload
    destination = tmp_path / "data.bin"
    urls = [f"{server.url}/missing.bin", f"{server.url}/data.bin"]
    with pytest.raises(DownloadError) as error:
        fetch(urls, destination, md5="0" * 32)
    message = str(error.value)
    assert "missing.bin: HTTP Error 404" in message
    assert f"MD5 {hashlib.md5(data).hexdigest()}, expected {'0' * 32}" in message
    assert str(destination) in message  # where to put a copy made by hand
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_existing_file_with_the_wrong_md5_is_replaced(server, payload, tmp_path):
    data, md5 = payload
    destination = tmp_path / "data.bin"
    destination.write_bytes(b"stale")
    fetch([f"{server.url}/data.bin"], destination, md5)
    assert destination.read_bytes() == data
