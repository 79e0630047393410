"""Probe: where the time of one offloaded optimizer step goes (issue 12), B3 model, one GPU.

Run under the launcher (it times dsrun's own functions by wrapping them in this process only):

    python -m dsrun.launcher.cli --num_gpus 1 benchmarks/probe_offload_step.py [--shape ...] [--stage 2]

Prints per step: engine.step() wall time, the host pipeline's run(), the CPU kernel calls summed, the
waits for gradient chunks (D2H) and weight slots (H2D) summed, and everything else in step().
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--no_monitor", action="store_true")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    import dsrun
    from b3_model import LlamaLM, ModelShape
    from dsrun.kernels import cpu_ops
    from dsrun.runtime.zero import host_pipeline
    if args.chunk:
        host_pipeline.CHUNK_ELEMS = args.chunk
    shape = ModelShape.parse(args.shape) if args.shape else ModelShape()
    torch.cuda.set_device(0)
    from bench_b3 import ds_config
    cfg = ds_config(args.stage, shape.micro_batch, 1, torch_adam=False)  # the B3 benchmark's config
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if args.no_monitor:
        cfg["metrics"] = {"enabled": False}
        cfg["hang_watchdog"] = {"enabled": False}
    torch.manual_seed(0)
    model = LlamaLM(shape).cuda()
    engine, *_ = dsrun.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    acc = defaultdict(float)
    cnt = defaultdict(int)

    def timed(name, fn):
        def wrap(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t0
                cnt[name] += 1
        return wrap
    cpu_ops.adam_step = timed("cpu_kernel", cpu_ops.adam_step)
    host_pipeline.HostStepPipeline.run = timed("pipeline_run", host_pipeline.HostStepPipeline.run)
    ev_sync = torch.cuda.Event.synchronize
    torch.cuda.Event.synchronize = timed("event_waits", ev_sync)
    from dsrun.runtime.zero import updater as upd
    upd.HostOffloadUpdater.step = timed("updater_step", upd.HostOffloadUpdater.step)
    zo = type(engine.zero)
    zo.global_grad_norm_sq = timed("grad_norm", zo.global_grad_norm_sq)
    tokens = torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq + 1), device="cuda")
    print(f"threads {torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"chunk {host_pipeline.CHUNK_ELEMS}", flush=True)
    for step in range(args.steps):
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        torch.cuda.synchronize()
        acc.clear()
        cnt.clear()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        row = {k: round(v * 1e3, 1) for k, v in acc.items()}
        row["step_total"] = round(total * 1e3, 1)
        row["calls"] = dict(cnt)
        print("STEP", step, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
