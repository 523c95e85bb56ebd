"""torchrun restarts: a worker killed at a random step, or torchrun itself killed, on CPU with gloo."""

import datetime
import subprocess
import sys
import threading

import pytest
import torch.distributed as dist
import torchrun_trials

import runtime
from runs import ROOT

TIMEOUT = datetime.timedelta(seconds=60)


def test_attempt_store_gives_all_ranks_one_new_prefix_whatever_earlier_attempts_left():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=TIMEOUT)

    def attempt(world_size: int, leftovers: list[str] = ()) -> dict[int, dist.Store]:
        for entry in leftovers:
            server.queue_push(runtime.ATTEMPT_QUEUE, entry)
        stores = {}

        def worker(rank: int) -> None:
            client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=TIMEOUT)
            stores[rank] = runtime.attempt_store(client, rank, world_size)

        threads = [threading.Thread(target=worker, args=(rank,)) for rank in reversed(range(world_size))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return stores

    first = attempt(3)
    for rank, store in first.items():
        store.set(f"address/{rank}", "of a process about to die")
    # what a failed attempt leaves in the queue: a request nobody answered, a confirmation nobody read
    second = attempt(3, leftovers=["ask:0123456789abcdef", "have:an-earlier-attempt"])
    second[1].set("address/1", "fresh")
    assert [store.check(["address/0"]) for store in second.values()] == [False] * 3  # no earlier key shows
    assert {rank: store.get("address/1") for rank, store in second.items()} == dict.fromkeys(range(3), b"fresh")


FAKE_AGENT = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stderr=subprocess.STDOUT)
worker.wait()
"""

WORKER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import runtime
if {ignore_sigterm}:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker stuck where it cannot stop
else:
    signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM: saving and stopping", flush=True), os._exit(75)))
runtime.stop_when_agent_dies(grace_s=0.5, poll_s=0.05)
print("worker", os.getpid(), "ready", flush=True)
time.sleep(30)  # without a watchdog the test fails after this
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("ignore_sigterm", [False, True], ids=["stops-on-sigterm", "ignores-sigterm"])
def test_worker_stops_when_torchrun_is_killed(ignore_sigterm):
    worker = WORKER.format(root=str(ROOT), ignore_sigterm=ignore_sigterm)
    agent = subprocess.Popen(
        [sys.executable, "-c", FAKE_AGENT, worker], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ready = agent.stdout.readline()
    assert ready.startswith("worker") and ready.endswith("ready\n"), ready
    agent.kill()
    agent.wait()
    # the worker holds the pipe's other end: end of file is the worker gone
    rest = agent.stdout.read()
    assert "is gone; stopping" in rest
    if ignore_sigterm:
        assert "still running 0.5s after SIGTERM; exiting" in rest
    else:
        assert "SIGTERM: saving and stopping" in rest and "exiting" not in rest


def trials(data, tmp_path, flags: str) -> list[dict]:
    args = torchrun_trials.parse_args(["--data", str(data), "--workdir", str(tmp_path), *flags.split()])
    return torchrun_trials.run_trials(args)


def test_torchrun_restart_after_a_worker_is_sigkilled_gives_the_uninterrupted_losses(tiny_data, tmp_path):
    (result,) = trials(tiny_data, tmp_path, "--trials 1 --steps 20 --signals KILL --timeout 240")
    assert result["recovered"], result


@pytest.mark.slow
def test_torchrun_recovers_in_sixteen_trials_killing_a_random_worker_at_a_random_step(tiny_data, tmp_path):
    results = trials(tiny_data, tmp_path, "--trials 16 --seed 1 --signals KILL,TERM --timeout 240")
    assert {r["signal"] for r in results} == {"KILL", "TERM"}
    assert [r for r in results if not r["recovered"]] == []


@pytest.mark.slow
def test_workers_of_a_killed_torchrun_stop_and_the_same_command_resumes(tiny_data, tmp_path):
    results = trials(tiny_data, tmp_path, "--agent --trials 3 --seed 2 --agent-grace 45 --timeout 240")
    assert [r for r in results if not r["recovered"]] == []
