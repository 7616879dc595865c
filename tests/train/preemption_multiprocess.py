"""One process of a two-process stop: `python preemption_multiprocess.py PORT PROCESS_ID OUT`.

Both processes join `jax.distributed` on localhost:PORT (CPU, gloo) and ask `StopRequests` at
steps 1 to 4; process 1 sends itself SIGTERM just before step 3. Each writes what it was told.
"""

import os
import signal
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jmoe.train.preemption import StopRequests  # noqa: E402


def main(port: str, process_id: int, out: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    seen = []
    with StopRequests() as stop:
        for step in range(1, 5):
            if step == 3 and process_id == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            seen.append(stop.requested())
    with open(out, "w") as f:
        f.write(" ".join(str(signum and int(signum)) for signum in seen) + "\n")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
