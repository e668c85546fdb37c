"""With downloads off the HF libraries send no request: a listener on loopback stands in for
the hub (HF_ENDPOINT) and counts the connections a fresh process makes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
from huggingface_hub import constants

from saesweep.collect.model import OFFLINE_VARIABLES, hub_access

LOAD = """
import sys
from saesweep.collect.model import load_model, load_tokenizer
from saesweep.errors import UserError

name, download = sys.argv[1], sys.argv[2] == "1"
try:
    model, _ = load_model(name, None, "float32", "cpu", download=download)
    load_tokenizer(name, None, download)
    print("loaded", type(model).__name__)
except UserError as err:
    print("refused:", err)
"""


@pytest.fixture
def hub():
    """(port, requests): a TCP listener on 127.0.0.1 that records the first bytes of every
    connection and closes it."""
    server = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                requests.append(conn.recv(4096))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], requests
    server.close()
    thread.join(timeout=10)


def load_in_a_fresh_process(name: str, download: bool, port: int, home) -> str:
    """Load model `name` in a process whose environment has no offline switch (the test
    session sets one) and whose hub is the listener; its output."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(home)}
    env |= {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    args = [sys.executable, "-c", LOAD, name, "1" if download else "0"]
    return subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout


def test_downloads_off_send_no_request(hub, tmp_path):
    """The packaged demo model loads, a hub name not in the cache is refused, and neither
    opens a connection (before the offline switch, the hub client asked for its agent
    registry even with local_files_only)."""
    port, requests = hub
    assert load_in_a_fresh_process("demo", False, port, tmp_path) == "loaded BertModel\n"
    refused = load_in_a_fresh_process("nobody/no-such-model", False, port, tmp_path)
    assert refused.startswith("refused: cannot load model 'nobody/no-such-model': give a local")
    assert "(downloads are off here)" in refused
    assert requests == []


def test_the_listener_sees_a_download(hub, tmp_path):
    """The control: with downloads on, the same name reaches the listener."""
    port, requests = hub
    refused = load_in_a_fresh_process("nobody/no-such-model", True, port, tmp_path)
    assert refused.startswith("refused: cannot load model 'nobody/no-such-model'")
    assert requests and all(r.startswith((b"GET ", b"HEAD ")) for r in requests)


def test_offline_mode_is_restored_after_a_load(monkeypatch):
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with hub_access(download=False):
        assert [os.environ[name] for name in OFFLINE_VARIABLES] == ["1", "1", "1"]
        assert constants.is_offline_mode()
    assert not any(name in os.environ for name in OFFLINE_VARIABLES)
    assert not constants.is_offline_mode()
    with hub_access(download=True):
        assert not constants.is_offline_mode()
