"""Tests of guided_diffusion.download against a local HTTP server (loopback only)."""

import http.server
import os
import threading

import pytest

from guided_diffusion.download import download_file
from guided_diffusion.errors import DownloadError

PAYLOAD = os.urandom(300_000)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/file.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_download_writes_the_complete_file(server, tmp_path):
    dest = str(tmp_path / "sub" / "file.bin")
    assert download_file(server + "/file.bin", dest, what="a test file") == dest
    assert open(dest, "rb").read() == PAYLOAD
    assert os.listdir(tmp_path / "sub") == ["file.bin"]


def test_existing_file_is_kept_without_network(tmp_path):
    dest = tmp_path / "model.pt"
    dest.write_bytes(b"mine")
    download_file("http://127.0.0.1:9/never", str(dest), what="x")
    assert dest.read_bytes() == b"mine"


def test_http_error_names_url_and_manual_fix_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "missing.pt"
    with pytest.raises(DownloadError) as info:
        download_file(server + "/missing.pt", str(dest), what="the classifier", place_hint="put it in models/")
    assert server + "/missing.pt" in str(info.value) and "put it in models/" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_unreachable_host_is_a_download_error(tmp_path):
    with pytest.raises(DownloadError, match="offline"):
        download_file("http://127.0.0.1:9/x.pt", str(tmp_path / "x.pt"), what="x", timeout=2)
