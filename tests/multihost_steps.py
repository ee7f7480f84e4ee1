"""One process of a 2-process CPU run (`jax.distributed` over loopback, gloo collectives).

Usage: `multihost_steps.py PORT NUM_PROCESSES PROCESS_ID MESH`. Each process has 2
simulated CPU devices (set XLA_FLAGS before start); process 0 prints the JSON result.
"""

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(port, num_processes, process_id, spec):
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
    heartbeat_timeout_seconds=10,
  )
  import sharded_steps

  from oftjax import sharding

  mesh = sharding.make_mesh(spec)
  result = sharded_steps.train(mesh, *sharded_steps.build())
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
