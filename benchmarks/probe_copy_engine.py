"""Probe: do copy-engine all-gathers (peer copies over symmetric memory) slow a concurrent GEMM less than
NCCL's? The measurement behind runtime/zero/copy_engine.py's [Note: copy-engine collectives].

    dsrun --num_gpus 4 benchmarks/probe_copy_engine.py     # rank 0 prints one PROBE line (times in ms)

gemm_alone / gemm+nccl_ag / gemm+ce_ag / gemm+ce_push: a 300-GEMM loop alone and beside 150 back-to-back
128 MB all-gathers on a side stream; *_alone: one all-gather; ce_ok: the pulled data is right.
"""
import os, time, torch, torch.distributed as dist

def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    n = 1 << 26  # 64Mi bf16 bucket = 128 MB; shard 32 MB
    shard = n // world
    a = torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16)
    b = torch.randn(2048, 5632, device=dev, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    def gemms(k=300):
        for _ in range(k):
            a @ b
    def timed(fn, comm=None, reps=1):
        torch.cuda.synchronize(); dist.barrier(); torch.cuda.synchronize()
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        if comm:
            with torch.cuda.stream(side):
                comm()
        s.record(); fn(); e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e)
    out = torch.empty(n, device=dev, dtype=torch.bfloat16)
    inp = out[rank * shard:(rank + 1) * shard]
    def nccl_ag(k=60):
        for _ in range(k):
            dist.all_gather_into_tensor(out, inp)
    res = {}
    gemms(50)
    res["gemm_alone"] = timed(gemms)
    res["gemm+nccl_ag"] = timed(gemms, lambda: nccl_ag(150))
    res["nccl_ag_alone"] = timed(lambda: nccl_ag(60)) / 60
    try:
        import torch.distributed._symmetric_memory as symm_mem
        group_name = dist.group.WORLD.group_name
        try:
            symm_mem.enable_symm_mem_for_group(group_name)
        except Exception as e:
            res["enable_err"] = repr(e)[:100]
        buf = symm_mem.empty(n, dtype=torch.bfloat16, device=dev)
        hdl = symm_mem.rendezvous(buf, group_name)
        peers = [hdl.get_buffer(r, (n,), torch.bfloat16) for r in range(world)]
        def ce_ag(k=60):
            for _ in range(k):
                hdl.barrier(channel=0)
                for j in range(1, world):
                    r = (rank + j) % world
                    buf[r * shard:(r + 1) * shard].copy_(peers[r][r * shard:(r + 1) * shard])
                hdl.barrier(channel=1)
        ce_ag(3); torch.cuda.synchronize()
        res["ce_ag_alone"] = timed(lambda: ce_ag(60)) / 60
        res["gemm+ce_ag"] = timed(gemms, lambda: ce_ag(150))
        # correctness
        buf.fill_(0); buf[rank * shard:(rank + 1) * shard].fill_(rank + 1); torch.cuda.synchronize(); dist.barrier()
        ce_ag(1); torch.cuda.synchronize()
        res["ce_ok"] = all(float(buf[r * shard]) == r + 1 for r in range(world))
        # push variant: write my shard into every peer
        def ce_push(k=60):
            for _ in range(k):
                hdl.barrier(channel=0)
                for j in range(1, world):
                    r = (rank + j) % world
                    peers[r][rank * shard:(rank + 1) * shard].copy_(buf[rank * shard:(rank + 1) * shard])
                hdl.barrier(channel=1)
        res["ce_push_alone"] = timed(lambda: ce_push(60)) / 60
        res["gemm+ce_push"] = timed(gemms, lambda: ce_push(150))
    except Exception as e:
        import traceback; res["symm_err"] = traceback.format_exc()[-800:]
    if rank == 0:
        print("PROBE", res, flush=True)
    dist.barrier()
    dist.destroy_process_group()

main()
