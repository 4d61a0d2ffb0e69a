"""Run a command as the ranks of one local CPU process group (gloo), as ``torchrun`` would."""

import os
import socket
import subprocess


def run_ranks(argv: list[str], *, n: int = 2, timeout: float = 180, env=None) -> list[str]:
    """Start ``argv`` ``n`` times with torchrun's environment (a free port, so parallel test runs do
    not collide), wait, assert every rank exited 0 (with its stderr tail) and return their stdouts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = []
    for rank in range(n):
        rank_env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        procs.append(
            subprocess.Popen(
                argv, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = []
    for rank, p in enumerate(procs):
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{err[-3000:]}"
        outs.append(out)
    return outs
