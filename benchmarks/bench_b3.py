"""Benchmark B3: ZeRO-1/2 throughput on the 1.26B Llama-shaped LM, dsrun beside its peers in one run.

Driver (default): for each GPU count and contender, starts one job with the dsrun launcher, collects
the JSON line each job prints, prints a table and appends it to benchmarks/RESULTS.md.

    python benchmarks/bench_b3.py --gpus 2,4 --modes dsrun-z1,dsrun-z2,fsdp2-noreshard,ds-z1,ds-z2
    python benchmarks/bench_b3.py --gpus 2 --modes dsrun-z3,fsdp2,ds-z3,dsrun-z2,fsdp2-noreshard   # ZeRO-3

CPU variant (gloo, 2 ranks): `--cpu --gpus 2 --shape 512,8,8,1376,8000,256,4`.
Worker: `--worker --mode M` (started by the driver). Contenders:
  dsrun-z1 / dsrun-z2   dsrun.initialize, bf16, fp32 master, AdamW, ZeRO stage 1 / 2 (DeepSpeed's config)
  dsrun-z3 / ds-z3      ZeRO-3, the model built under `zero.Init` (each rank holds 1/world of it), one unit
                        per block, small params persistent, `stage3_max_reuse_distance: 0` (only the block
                        that finished forward last stays gathered into backward, like FSDP2's reshard)
  dsrun-z1-pg / -z2-pg  the same plus `zero_optimization.overlap_param_gather` (dsrun option: the post-step
                        all-gather runs under the next forward)
  dsrun-...-nccl        the same with `zero_optimization.copy_engine_comm: false` (all-gathers and gradient
                        all-to-alls by NCCL kernels instead of copy engines)
  dsrun-...-nomon       the same with dsrun's monitoring off (`metrics.enabled` and `hang_watchdog.enabled`
                        false); beside the plain contender it measures what progress, the metrics folder and
                        the watchdog cost: `--modes dsrun-z2,dsrun-z2-nomon` (every contender prints every
                        10 steps, as DeepSpeed's documented `steps_per_print` default)
  dsrun-z2-off / ds-z2-off / dsrun-z3-off  the same with `offload_optimizer: {device: cpu, pin_memory: true}`
                        (DeepSpeed steps with its DeepSpeedCPUAdam); `-poff` (ZeRO-3) adds `offload_param`
  fsdp2-off             fsdp2 (reshard) with `CPUOffloadPolicy(pin_memory=True)`, torch's fused CPU AdamW
  ds-z1 / ds-z2         DeepSpeed from PyPI with the same config (skipped when not importable)
  fsdp2 / fsdp2-noreshard  torch fully_shard per block, bf16 params, fp32 reduce, fused AdamW
  ddp                   torch DDP under bf16 autocast, fused AdamW
  compute               bf16 module, forward + backward only, no communication, no optimizer: the floor

`--phases N` adds N steps with a device sync between forward, backward and step and reports each
phase's median (where the time goes; these steps are not in the headline figure).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DSRUN = [sys.executable, "-m", "dsrun.launcher.cli"]
sys.path.insert(0, HERE)


def ds_config(stage, micro_batch, world, torch_adam):
    opt = {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if torch_adam:
        opt["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": opt},
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                              **({"stage3_max_reuse_distance": 0} if stage == 3 else {})},
    }


def worker(args):
    import torch
    import torch.distributed as dist
    from b3_model import LlamaLM, ModelShape

    shape = ModelShape.parse(args.shape) if args.shape else ModelShape()
    cuda = torch.cuda.is_available() and not args.cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    mode = args.mode
    world = int(os.environ.get("WORLD_SIZE", 1))
    if mode.startswith("dsrun") or mode.startswith("ds-"):
        if mode.startswith("dsrun"):
            import dsrun as engine_lib
        else:
            import deepspeed as engine_lib
        stage = int(mode.split("-")[1][1])
        cfg = ds_config(stage, shape.micro_batch, world, torch_adam=mode.startswith("ds-"))
        if "-pg" in mode:
            cfg["zero_optimization"]["overlap_param_gather"] = True
        if "-nccl" in mode:
            cfg["zero_optimization"]["copy_engine_comm"] = False
        if "-off" in mode or "-poff" in mode:  # CPU optimizer offload (DeepSpeed: its DeepSpeedCPUAdam)
            cfg["optimizer"]["params"].pop("torch_adam", None)
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if "-poff" in mode:  # and ZeRO-3 parameter offload
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
        if "-nomon" in mode and mode.startswith("dsrun"):
            cfg["metrics"] = {"enabled": False}
            cfg["hang_watchdog"] = {"enabled": False}
        if not cuda:
            cfg.pop("bf16")
        with engine_lib.zero.Init(config_dict_or_path=cfg, enabled=stage == 3), torch.device(device):
            model = LlamaLM(shape)
        if stage == 3:  # LlamaLM's own init ran on partitioned parameters: run it again on whole ones
            with engine_lib.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                model.init_weights()
        num_params = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())
        engine, _, _, _ = engine_lib.initialize(model=model.to(device), model_parameters=model.parameters(), config=cfg)

        def train_step(tokens, targets, phase=None):
            loss = engine(tokens, targets)
            phase and phase("fwd")
            engine.backward(loss)
            phase and phase("bwd")
            engine.step()
            return loss
    else:
        with torch.device("meta" if mode.startswith("fsdp") else device):
            model = LlamaLM(shape)
        num_params = sum(p.numel() for p in model.parameters())
        if mode == "compute":
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
            net = model.to(device, torch.bfloat16 if cuda else torch.float32)

            def train_step(tokens, targets, phase=None):
                loss = net(tokens, targets)
                phase and phase("fwd")
                loss.backward()
                phase and phase("bwd")
                for p in net.parameters():
                    p.grad = None
                return loss
        else:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
            if mode.startswith("fsdp2"):
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
                kw = {"reshard_after_forward": mode in ("fsdp2", "fsdp2-off")}
                if mode == "fsdp2-off":
                    from torch.distributed.fsdp import CPUOffloadPolicy
                    kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
                if mp:
                    kw["mp_policy"] = mp
                for block in model.layers:
                    fully_shard(block, **kw)
                fully_shard(model, **kw)
                # CPUOffloadPolicy: the sharded parameters live (and are initialised) on the host
                model.to_empty(device="cpu" if mode == "fsdp2-off" else device)
                torch.manual_seed(0)
                model.init_weights()
                net = model
            else:  # ddp
                net = torch.nn.parallel.DistributedDataParallel(model.to(device), bucket_cap_mb=100)
            # with CPUOffloadPolicy the parameters live on the host: torch's fused CPU AdamW steps them there
            opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

            def train_step(tokens, targets, phase=None):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and mode == "ddp"):
                    loss = net(tokens, targets)
                phase and phase("fwd")
                loss.backward()
                phase and phase("bwd")
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

    rank = dist.get_rank()

    def split(b):
        return b[:, :-1], b[:, 1:]
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    batches = [torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq + 1), generator=g) for _ in range(4)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    # allocated GiB after building, and after forward/backward/step of the last warm-up step (host-side
    # allocator counts: no sync), then the peak so far
    mem = {"init": round(torch.cuda.memory_allocated() / 2**30, 2)} if cuda else {}

    def mem_phase(name):
        mem[name] = round(torch.cuda.memory_allocated() / 2**30, 2)
    for step in range(args.warmup):
        last = cuda and step == args.warmup - 1
        losses.append(float(train_step(*split(batches[step % len(batches)].to(device)),
                                       mem_phase if last else None).detach()))
        last and mem_phase("step")
    if cuda:
        mem["max"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    # [Note: windowed timing] the timed steps run back to back with no host sync between them (as in real
    # training, where the loss is read every N steps): the headline is the window's mean step. Work a
    # contender leaves running past step() (overlapped all-gathers) is paid for by the next step.
    inputs = [split(batches[(args.warmup + i) % len(batches)].to(device)) for i in range(args.steps)]
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)] if cuda else []
    sync()
    t0 = time.perf_counter()
    window = []
    for i, x in enumerate(inputs):
        marks and marks[i].record()
        window.append(train_step(*x).detach())
    marks and marks[-1].record()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    # per step, between the events queued as each step began (device time; the last one excludes work
    # left running past the final step())
    each_ms = [round(a.elapsed_time(b), 1) for a, b in zip(marks, marks[1:])]
    losses += [float(x) for x in window]
    if args.profile:  # every rank steps (collectives), rank 0 records
        import contextlib

        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with (profile(activities=acts) if dist.get_rank() == 0 else contextlib.nullcontext()) as prof:
            for x in inputs[:3]:
                train_step(*x)
            sync()
        if prof is not None:
            prof.export_chrome_trace(os.path.join(args.profile, f"trace_{mode}_{world}.json"))
            print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=20))
    dist.barrier()
    phases = {}
    for step in range(args.phases):
        b = batches[step % len(batches)].to(device)
        sync()
        marks = [("start", time.perf_counter())]

        def phase(name):
            sync()
            marks.append((name, time.perf_counter()))
        train_step(b[:, :-1], b[:, 1:], phase)
        phase("step")
        for (_, t0), (name, t1) in zip(marks, marks[1:]):
            phases.setdefault(name, []).append(t1 - t0)
    tokens = shape.micro_batch * shape.seq
    result = {
        "mode": mode, "world": world, "step_ms": round(step_s * 1e3, 1),
        "tok_s_gpu": round(tokens / step_s), "mfu": round(tokens / step_s * shape.flops_per_token(num_params) / 989e12, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "params": num_params,
    }
    if each_ms:
        result["each_ms"] = each_ms
    if mem:
        result["mem_gib"] = mem
    if phases:
        result["phases_ms"] = {k: round(sorted(v)[len(v) // 2] * 1e3, 1) for k, v in phases.items()}
    if rank == 0:
        print("B3RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def versions():
    out = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "dsrun"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def driver(args):
    results = []
    for world in [int(w) for w in args.gpus.split(",")]:
        for mode in args.modes.split(","):
            if mode.startswith("ds-") and versions()["deepspeed"] is None:
                print(f"skip {mode}: deepspeed not importable", flush=True)
                continue
            cmd = DSRUN + ["--num_gpus", str(world), __file__, "--worker", "--mode", mode,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--phases", str(args.phases)]
            if args.profile:
                cmd += ["--profile", args.profile]
            if args.shape:
                cmd += ["--shape", args.shape]
            if args.cpu:
                cmd += ["--cpu"]
            print("$ " + shlex.join(cmd), flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((l for l in proc.stdout.splitlines() if "B3RESULT " in l), None)
            if proc.returncode != 0 or line is None:
                print(f"FAILED {mode} x{world} rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", flush=True)
                results.append({"mode": mode, "world": world, "error": f"rc={proc.returncode}"})
                continue
            r = json.loads(line.split("B3RESULT ", 1)[1])
            r["wall_s"] = round(time.time() - t0, 1)
            results.append(r)
            print(json.dumps(r), flush=True)
    report(args, results)


def report(args, results):
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else platform.processor() or "cpu"
    head = "| contender | ranks | step ms | tok/s/GPU | MFU | peak GiB | loss first→last |\n|---|---|---|---|---|---|---|\n"
    rows = "".join(
        f"| {r['mode']} | {r['world']} | {r.get('step_ms', '-')} | {r.get('tok_s_gpu', r.get('error'))} | "
        f"{r.get('mfu', '-')} | {r.get('peak_gib', '-')} | {r.get('loss_first', '-')}→{r.get('loss_last', '-')} |"
        + (f" {r['phases_ms']}" if r.get("phases_ms") else "")
        + (f" mem {r['mem_gib']}" if r.get("mem_gib") else "") + "\n"
        for r in results)
    text = (f"\n## B3 ZeRO throughput ({datetime.date.today().isoformat()})\n\n"
            f"- machine: {dev} x{torch.cuda.device_count() if torch.cuda.is_available() else 0}, "
            f"{os.cpu_count()} CPU cores\n- versions: {json.dumps(versions())}\n"
            f"- command: `python benchmarks/bench_b3.py {' '.join(sys.argv[1:])}`\n"
            f"- shape: {args.shape or 'd=2048 L=22 H=32 ffn=5632 V=32000 seq=2048 mb=4 (1.26B)'}; "
            f"{args.warmup} warm-up steps, then {args.steps} steps timed as one window (no host sync between "
            f"steps); step ms = window / steps\n\n" + head + rows)
    print(text, flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--mode", default="dsrun-z2")
    p.add_argument("--modes", default="dsrun-z1,dsrun-z2,fsdp2-noreshard,ds-z1,ds-z2")
    p.add_argument("--gpus", default="2,4")
    p.add_argument("--shape", default="")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--phases", type=int, default=0)
    p.add_argument("--profile", default="", help="directory: rank 0 writes a chrome trace of 3 steps per job")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
