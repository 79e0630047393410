"""A rank for the output and logging tests: `ux.py [--local_rank=N] MODE`.

Modes:
  bar       "loading" without a newline, 1 s later " done"; then a \\r progress bar (stderr, as tqdm)
  torch     a line with torch's excepthook prefix `[rankN]: ` on stderr
  wait      join a gloo group, write ready<RANK> under $DSRUN_TEST_OUT, then sleep (for Ctrl-C)
  warn      a warning from every rank through dsrun's logger, once and per rank
  fail      print a line and exit 3
  auto      dsrun.initialize with "auto" values and a deprecated config key (gloo, CPU)
"""
import os
import sys
import time

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank=")]
mode = args[0]
rank = int(os.environ.get("RANK", "0"))
out_dir = os.environ.get("DSRUN_TEST_OUT", ".")

if mode == "bar":
    sys.stdout.write("loading")
    sys.stdout.flush()
    time.sleep(1.0)
    print(" done", flush=True)
    for pct in (0, 25, 50, 75, 100):
        sys.stderr.write(f"\rbar {pct:3d}%")
        sys.stderr.flush()
        time.sleep(0.05)
    sys.stderr.write("\n")
elif mode == "torch":
    print(f"[rank{rank}]: Traceback line", file=sys.stderr)
elif mode == "wait":  # a gloo group first: torch then installs its excepthook, as in a real job
    import torch.distributed as dist

    dist.init_process_group("gloo")
    with open(os.path.join(out_dir, f"ready{rank}"), "w"):
        pass
    time.sleep(60)
elif mode == "warn":
    from dsrun.runtime.log import get_logger, warn_once_rank0

    warn_once_rank0("shared warning from the config")
    get_logger().warning("per-rank warning")
    get_logger().info("per-rank info")
elif mode == "fail":
    print("about to fail", flush=True)
    sys.exit(3)
elif mode == "auto":
    import torch

    import dsrun

    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": "auto",
              "optimizer": {"type": "Adam", "params": {"lr": "auto"}},
              "zero_optimization": {"stage": 0, "cpu_offload": False}}
    model = torch.nn.Linear(4, 4)
    engine, *_ = dsrun.initialize(model=model, model_parameters=model.parameters(), config=config)
    print(f"micro batch {engine.train_micro_batch_size_per_gpu()}", flush=True)
