"""Clean shutdown: Ctrl-C or SIGTERM stops the whole stack in order, and each service alone, without a traceback.

`cortexctl up` runs in a session of its own, as in a terminal: Ctrl-C there is a
SIGINT to the whole foreground process group, which is what the test sends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import httpx
import psutil
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import (
    TINY_MODEL,
    child_env,
    free_port,
    get_json,
    ready_models,
    start_gateway,
    start_worker,
    wait_for,
)


def stack_catalogue(tmp_path: Path, tiny_model_dir: Path) -> Path:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{TINY_MODEL}"\npath = "{tiny_model_dir}"\n')
    return catalogue


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_stack_stops_in_order_without_a_traceback(tmp_path: Path, tiny_model_dir: Path, sig: int) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "cortex.broker", "up", "--port", str(port), "--metrics-port", str(free_port()),
            "--nats-port", "0", "--data-dir", str(tmp_path / "data"), "--models",
            str(stack_catalogue(tmp_path, tiny_model_dir)), "--model", TINY_MODEL, "--device", "cpu"]  # fmt: skip
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    try:
        wait_for(lambda: TINY_MODEL in ready_models(f"http://127.0.0.1:{port}/v1"), timeout=120, what="stack up",
                 proc=proc)  # fmt: skip
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # nats-server, the gateway, the worker
        body = {"model": TINY_MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            proc.send_signal(sig)  # systemd or kill: the launcher alone
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert "Traceback" not in output, output
    assert output.rstrip().endswith("Stopped.")


def test_a_worker_and_a_gateway_stop_alone_on_sigterm(
    nats_server: EmbeddedNats, tmp_path: Path, tiny_model_dir: Path
) -> None:
    worker_log = tmp_path / "worker.log"
    worker = start_worker(nats_server.url, stack_catalogue(tmp_path, tiny_model_dir), worker_log, "--model",
                          TINY_MODEL, "--device", "cpu", "--worker-id", "stopping-alone")  # fmt: skip
    gateway = start_gateway(nats_server.url, tmp_path)
    try:
        # The session worker may serve the model too: wait for this worker's own copy.
        wait_for(lambda: "stopping-alone" in _loaded_on(gateway.base_url), timeout=120, what="worker ready",
                 proc=worker)  # fmt: skip
        for proc in (gateway.proc, worker):  # as `systemctl stop` does, one unit at a time
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in (gateway.proc, worker):
            if proc.poll() is None:
                proc.kill()
    for log in [worker_log, *tmp_path.glob("gateway-*.log")]:
        assert "Traceback" not in log.read_text(), log.read_text()


def _loaded_on(base_url: str) -> list[str]:
    """The workers serving the tiny model; none while no worker has advertised it (the gateway says 404 then)."""
    try:
        model = get_json(f"{base_url}/models/{TINY_MODEL}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise
    assert isinstance(model, dict)
    return list(model.get("loaded_on", []))


def test_a_worker_process_exits_while_a_load_is_under_way(tmp_path: Path) -> None:
    # A load cannot be stopped mid-phase; the process's exit must not wait for it (loader threads are daemons).
    script = tmp_path / "exit_mid_load.py"
    script.write_text(
        "import asyncio, threading\n"
        "from cortex.worker.loading import Loads\n"
        "from cortex.worker.synthetic import SyntheticEngine\n"
        "started = threading.Event()\n"
        "def loader(spec, abort):\n"
        "    started.set()\n"
        "    threading.Event().wait(600)  # a load that never reaches its next phase\n"
        "async def main():\n"
        "    loads = Loads(loader, SyntheticEngine(worker_id='w', interval=0.0))\n"
        "    loads.start(None, threading.Event())\n"
        "    await asyncio.to_thread(started.wait, 30)\n"
        "    loads.shutdown()\n"
        "    print('left', flush=True)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "left"
