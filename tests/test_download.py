"""dataset_download against archives served from 127.0.0.1 by the test itself (no network)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import subprocess
import tarfile
import threading
import zipfile

import pytest

from conftest import ROOT, png_bytes, xray_like
from xray.config import load_config
from xray.download import download_dataset, run_download
from xray.errors import DataError

SUBDIR = "X-Ray Image DataSet"
CLASSES = {"Covid-19": 3, "No_findings": 2, "Pneumonia": 2}


def _members() -> dict[str, bytes]:
    """Archive members laid out like the source repository's master.zip."""
    members = {"COVID-19-master/README.md": b"# readme\n", "COVID-19-master/code/train.py": b"print(1)\n"}
    for k, (cls, n) in enumerate(CLASSES.items()):
        for i in range(n):
            members[f"COVID-19-master/{SUBDIR}/{cls}/{cls.lower()}_{i}.png"] = png_bytes(xray_like(k, i, (24, 20)))
    return members


def _zip(members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _corrupt_zip(members: dict[str, bytes]) -> bytes:
    """A well-formed zip whose first image's stored bytes are altered: its CRC no longer matches."""
    data = bytearray(_zip(members, zipfile.ZIP_STORED))
    png = next(v for k, v in members.items() if k.endswith(".png"))
    at = data.index(png) + len(png) // 2
    data[at] ^= 0xFF
    return bytes(data)


class Server:
    """Serves ``routes`` (path -> body, or (body, announced length) to cut the transfer short)."""

    def __init__(self, routes: dict[str, bytes | tuple[bytes, int]]):
        self.routes = routes
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                body, length = route if isinstance(route, tuple) else (route, len(route))
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


MEMBERS = _members()
ZIP = _zip(MEMBERS)
TGZ = _tar_gz(MEMBERS)


@pytest.fixture(scope="module")
def server():
    s = Server(
        {
            "/master.zip": ZIP,
            "/data.tar.gz": TGZ,
            "/short.zip": (ZIP[: len(ZIP) // 2], len(ZIP)),  # the connection drops halfway
            "/corrupt.zip": _corrupt_zip(MEMBERS),
            "/truncated.tar.gz": TGZ[: len(TGZ) * 2 // 3],  # a complete transfer of a cut file
            "/page.html": b"<html><body>moved</body></html>",
            "/unsafe.zip": _zip({**MEMBERS, f"../{SUBDIR}/evil.png": b"x"}),
            "/noclasses.zip": _zip({f"top/{SUBDIR}/readme.txt": b"nothing here"}),
        }
    )
    yield s
    s.close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/master.zip"  # nothing listens there any more


def _tree(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


def _expected_tree() -> dict[str, bytes]:
    prefix = f"COVID-19-master/{SUBDIR}/"
    return {k[len(prefix):].replace("/", os.sep): v for k, v in MEMBERS.items() if k.startswith(prefix)}


def test_zip_download_unpacks_class_folders_into_raw_dir(server, tmp_path):
    config = load_config(os.path.join(ROOT, "config.yaml"))
    raw = tmp_path / "data" / "raw"  # its parent does not exist either
    exp = config.experiment(
        "dataset_download", [f"dataset.download_url={server.url('/master.zip')}", f"dataset.raw_dir={raw}"]
    )
    logs: list[str] = []
    listing = run_download(exp, log=logs.append)

    assert _tree(raw) == _expected_tree()  # every class folder, byte for byte, nothing else
    assert {c: len(v) for c, v in listing.files.items()} == CLASSES
    assert os.listdir(tmp_path / "data") == ["raw"]  # the temporary folder is gone
    assert any(f"{len(ZIP) / 1e6:.1f} MB in" in line and "MB/s" in line for line in logs)
    assert "Covid-19: 3, No_findings: 2, Pneumonia: 2" in logs[-1]

    # A second run finds the data and downloads nothing.
    before = len(server.requests)
    download_dataset(server.url("/master.zip"), str(raw), SUBDIR, log=logs.append)
    assert len(server.requests) == before and "nothing to do" in logs[-1]


def test_tar_gz_with_checksum_and_progress(server, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()  # an empty folder is replaced
    logs: list[str] = []
    download_dataset(
        server.url("/data.tar.gz"), str(raw), SUBDIR, sha256=hashlib.sha256(TGZ).hexdigest(),
        progress_every=0.0, log=logs.append,
    )
    assert _tree(raw) == _expected_tree()
    progress = [line for line in logs if " of " in line and "%" in line]
    assert progress and progress[-1].startswith(f"download: {len(TGZ) / 1e6:.1f} MB of {len(TGZ) / 1e6:.1f} MB (100%)")


@pytest.mark.parametrize(
    "path, message",
    [
        ("/missing.zip", "HTTP 404 Not Found"),
        ("/short.zip", "incomplete"),
        ("/corrupt.zip", "damaged or incomplete (bad checksum of COVID-19-master/"),
        ("/truncated.tar.gz", "damaged or incomplete"),
        ("/page.html", "not a zip or tar archive"),
        ("/unsafe.zip", "unsafe path"),
        ("/noclasses.zip", "does not hold one folder per class"),
        ("offline", "offline?"),
    ],
)
def test_failures_leave_no_raw_dir(server, tmp_path, path, message):
    url = _closed_port_url() if path == "offline" else server.url(path)
    raw = tmp_path / "raw"
    with pytest.raises(DataError, match=message.replace("?", r"\?").replace("(", r"\(")) as info:
        download_dataset(url, str(raw), SUBDIR, log=lambda _: None)
    text = str(info.value)
    assert "\n" not in text
    if path in ("/missing.zip", "/short.zip", "/corrupt.zip", "offline"):
        assert "point dataset.raw_dir at a copy" in text  # names the alternative
    assert os.listdir(tmp_path) == []  # no raw_dir, no half-filled folder, no temporary folder


def test_checksum_mismatch_and_missing_subdir(server, tmp_path):
    raw = tmp_path / "sub" / "raw"
    with pytest.raises(DataError, match="has SHA-256 .* expected 00ff"):
        download_dataset(server.url("/master.zip"), str(raw), SUBDIR, sha256="00ff", log=lambda _: None)
    with pytest.raises(DataError, match="no folder 'Images' .*top level: COVID-19-master"):
        download_dataset(server.url("/master.zip"), str(raw), "Images", log=lambda _: None)
    assert os.listdir(tmp_path) == []  # the parent folders it made are removed again


def test_existing_folder_that_is_not_a_data_set_is_left_alone(server, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a data set"):
        download_dataset(server.url("/master.zip"), str(raw), SUBDIR, log=lambda _: None)
    assert os.listdir(raw) == ["notes.txt"]


def _cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """``python -m xray ARGS`` in this process (neither command starts Spark; a process of its own
    would only add a Python start and the project's imports): its exit code and output."""
    from xray.cli import main

    capsys.readouterr()
    code = main(["--config", os.path.join(ROOT, "config.yaml"), *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["xray", *args], code, out, err)


@pytest.mark.slow
def test_cli_download_job(server, tmp_path, capsys):
    raw = tmp_path / "raw"
    done = _cli(capsys, "run", "dataset_download", "--set", f"dataset.download_url={server.url('/data.tar.gz')}",
                "--set", f"dataset.raw_dir={raw}")
    assert done.returncode == 0, done.stderr
    assert _tree(raw) == _expected_tree()
    assert "download: 7 images in" in done.stdout


@pytest.mark.slow
def test_experiment_without_raw_data_downloads_first_and_fails_in_one_line(server, tmp_path, capsys):
    raw = tmp_path / "raw"
    done = _cli(capsys, "run", "ResNet50_binary_classification", "--set", "weights=random",
                "--set", f"dataset.raw_dir={raw}", "--set", f"dataset.download_url={server.url('/gone.zip')}")
    assert done.returncode == 2
    assert server.requests[-1] == "/gone.zip"  # the experiment asked for the archive
    assert done.stderr.strip().splitlines() == [
        f"error: data folder {raw} not found, and fetching it failed: "
        f"cannot download the data set from {server.url('/gone.zip')}: HTTP 404 Not Found: check dataset.download_url, "
        "or point dataset.raw_dir at a copy of the data set (--set dataset.raw_dir=PATH, one folder per class)"
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert not raw.exists()
