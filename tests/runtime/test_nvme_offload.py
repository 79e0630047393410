"""Offload to NVMe (`device: nvme`, runtime/zero/nvme.py and swap.py) and parameter offload (ZeRO-3).

- stages 1-3 with the optimizer on NVMe (a real folder under tmp_path), and stage 3 with the parameters
  on the CPU or NVMe, train step by step like plain PyTorch (fp32 AdamW, clipping, GAS 2) on 2 gloo
  ranks; between steps the masters and states are only in the files; the folder is gone after
  `destroy()`; bf16 with parameter offload tracks bf16 without it;
- a checkpoint saved with NVMe offload (ZeRO-3, 2 ranks) loads on 1 rank with and without offload;
- under the launcher the job's folder is removed at the end, and a file-size limit (RLIMIT_FSIZE) is a
  clear error naming the file and the bytes (exit code 1, no hang), the folder removed too;
- the pwrite path itself turns EFBIG into that error; the swapper round-trips with and without
  O_DIRECT and a truncated file is an error; a dead process's folder is swept;
- the disk and host budget checks refuse what cannot fit; a missing nvme_path is a ConfigError; the
  `aio` section reaches the swapper.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_ranks  # noqa: E402
from test_offload import CLIP, GAS, LR, MICRO, STEPS, make_data, make_model, reference, train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nvme_config(stage, world, path, *, params=False, optimizer="nvme"):
    zero = {"stage": stage, "reduce_bucket_size": 60}
    if optimizer:
        zero["offload_optimizer"] = {"device": optimizer, "nvme_path": path, "buffer_count": 2}
    if params:
        zero["offload_param"] = {"device": params, "nvme_path": path, "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "train_batch_size": MICRO * GAS * world, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
            "zero_optimization": zero, "aio": {"block_size": 4096, "queue_depth": 4, "thread_count": 1}}


def _train_nvme(rank, world, path, cells):
    import dsrun
    out = {}
    for stage, params, optimizer in cells:
        cfg = nvme_config(stage, world, path, params=params, optimizer=optimizer)
        engine, *_ = dsrun.initialize(model=make_model(), config=cfg)
        assert getattr(engine.zero.weights, "host_shards", False) == bool(params)
        train(engine, rank, world, make_data(world))
        folder = engine.zero.nvme.swapper.folder if engine.zero.nvme else None
        if folder:
            assert folder == os.path.join(path, "dsrun-job7", f"rank{rank}")
        files = sorted(os.listdir(folder)) if folder else []
        out[stage, params, optimizer] = ([v.clone() for v in engine.module_state_dict().values()], files)
        if engine.zero.nvme:  # between steps the masters and states are in the files only
            engine.zero.nvme.flush()
            held = [t for m in engine.zero.masters for t in engine.zero.nvme._tensors(m).values()
                    if t.untyped_storage().nbytes()]
            assert held == [] and len(engine.zero.optimizer.state) == len(engine.zero.masters)
        engine.destroy()
    torch.distributed.barrier()  # both ranks' engines are gone
    out["left"] = sorted(os.listdir(path))
    return out


CELLS = [(1, False, "nvme"), (2, False, "nvme"), (3, False, "nvme"), (3, "cpu", "cpu"), (3, "cpu", "nvme"),
         (3, "nvme", "nvme")]


@pytest.fixture(scope="module")
def nvme_cells(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("nvme"))
    return run_ranks(_train_nvme, world_size=2, args=(path, CELLS), env={"DSRUN_JOB_ID": "job7"}, timeout=300)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"stage{c[0]}-param-{c[1] or 'none'}-opt-{c[2] or 'none'}")
def test_nvme_offload_matches_pytorch(nvme_cells, cell):
    want = reference(2, "config-adamw")
    for per_rank in nvme_cells:
        state, files = per_rank[cell]
        for p, q in zip(state, want):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        if cell[2] == "nvme":
            assert "bucket0.master.swp" in files and "bucket0.exp_avg_sq.swp" in files, files
    for a, b in zip(nvme_cells[0][cell][0], nvme_cells[1][cell][0]):
        assert torch.equal(a, b)


def test_swap_folder_is_removed_when_the_engine_ends(nvme_cells):
    for per_rank in nvme_cells:
        assert per_rank["left"] == []


FULL_DISK_SCRIPT = textwrap.dedent("""
    import argparse, resource
    import torch
    import dsrun

    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--fsize", type=int, default=0)
    dsrun.add_config_arguments(parser)
    args = parser.parse_args()
    if args.fsize:  # the drive is "full" past this many bytes per file; each rank's swap files need 8 KiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    torch.manual_seed(0)
    engine, *_ = dsrun.initialize(args=args, model=torch.nn.Linear(64, 64, bias=False))
    engine.backward(engine(torch.randn(2, 64)).pow(2).mean())
    engine.step()
    print("trained in", engine.zero.nvme.swapper.folder, flush=True)  # no destroy(): the exit teardown's job
""")


def _launch(tmp_path, swap, *script_args):
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 4096,
                                 "offload_optimizer": {"device": "nvme", "nvme_path": str(swap)}}}
    (tmp_path / "train.py").write_text(FULL_DISK_SCRIPT)
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k != "DS_ENV_FILE"}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", "train.py",
                           "--deepspeed_config", "ds.json", *script_args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    return done.returncode, done.stdout + done.stderr


def test_the_job_folder_is_removed_when_the_job_ends(tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    rc, out = _launch(tmp_path, swap)
    assert rc == 0, out
    assert f"trained in {swap}/dsrun-" in out and "/rank1" in out
    assert os.listdir(swap) == []


def test_a_full_disk_is_a_clear_error_and_the_folder_is_removed(tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    rc, out = _launch(tmp_path, swap, "--fsize", "4096")
    assert rc == 1, out
    assert "NVMe offload could not allocate 8192 bytes in " + str(swap) in out, out
    assert "file-size limit" in out and "Traceback" not in out, out
    assert "trained" not in out
    left = [os.path.join(d, f) for d, _, fs in os.walk(swap) for f in fs]
    assert os.listdir(swap) == [], (left, out)


def test_a_write_past_the_file_size_limit_is_an_error_not_a_signal(tmp_path):
    """The pwrite path itself (filesystems without fallocate): a short write, then EFBIG, never SIGXFSZ."""
    code = textwrap.dedent(f"""
        import os, resource
        from dsrun.runtime.zero import swap
        swap._ignore_sigxfsz()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        path = {str(tmp_path / "f.swp")!r}
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            swap._write(fd, path, memoryview(bytes(3000)), 0, 3000)
        except swap.SwapError as exc:
            print("refused:", exc)
        print("size", os.path.getsize(path))
    """)
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"refused: NVMe offload could not write 3000 bytes in {tmp_path / 'f.swp'}" in done.stdout
    assert "file-size limit" in done.stdout and "size 1000" in done.stdout


def test_nvme_budget_check_and_a_missing_path_are_config_errors(tmp_path):
    from dsrun.errors import ConfigError
    from dsrun.runtime.zero.nvme import nvme_bytes_needed
    from dsrun.runtime.zero.swap import check_disk_budget, check_nvme_path
    # 1B parameters over 8 ranks, 8 per node: fp32 master + Adam's 2 states per owned element
    needed = nvme_bytes_needed(10**9 // 8, state_elems=2, local_ranks=8)
    assert needed == 12 * 10**9
    check_disk_budget(str(tmp_path), needed, local_ranks=8, where="k", free=needed)
    with pytest.raises(ConfigError) as err:
        check_disk_budget(str(tmp_path), needed, local_ranks=8, where="zero_optimization.offload_optimizer.nvme_path",
                          free=10**9)
    msg = str(err.value)
    assert str(needed) in msg and str(10**9) in msg and "zero_optimization.offload_optimizer.nvme_path" in msg
    assert err.value.exit_code == 2
    with pytest.raises(ConfigError, match="not an existing directory"):
        check_nvme_path(str(tmp_path / "nope"), "k")
    # host memory with NVMe: buffer_count of the largest bucket's master + Adam states, plus on a GPU with
    # bf16 the fp32 gradient and bf16 staging buffers of every owned element
    from types import SimpleNamespace

    from dsrun.runtime.zero.nvme import nvme_host_bytes_needed
    layout = SimpleNamespace(buckets=[SimpleNamespace(own_start=0, own_end=1000), SimpleNamespace(own_start=0, own_end=10)])
    assert nvme_host_bytes_needed(layout, state_elems=2, buffer_count=4, local_ranks=2, device_is_host=False,
                                  param_bytes=2) == (1000 * 12 * 4 + 1010 * 6) * 2
    assert nvme_host_bytes_needed(layout, state_elems=2, buffer_count=4, local_ranks=1, device_is_host=True) == 48000


def _save_nvme(rank, world, ckpt, swap):
    import dsrun
    data = make_data(world, STEPS + 1)
    engine, *_ = dsrun.initialize(model=make_model(), config=nvme_config(3, world, swap))
    train(engine, rank, world, data[:STEPS])
    engine.save_checkpoint(ckpt, tag="t")
    train(engine, rank, world, data[STEPS:])  # the state swapped in for the save goes back to the files
    state = {k: v.clone() for k, v in engine.module_state_dict().items()}
    engine.destroy()
    return state


def _load(rank, world, ckpt, swap):
    import dsrun
    cfg = nvme_config(1, world, swap, optimizer="nvme" if swap else None)
    engine, *_ = dsrun.initialize(model=make_model(), config=cfg)
    engine.load_checkpoint(ckpt, tag="t")
    x, y = make_data(2, STEPS + 1)[STEPS]  # the same global batch the 2-rank run took
    for k in range(GAS):
        rows = slice(k * 2 * MICRO, (k + 1) * 2 * MICRO)
        engine.backward(torch.nn.functional.mse_loss(engine(x[rows]), y[rows]))
        engine.step()
    state = {k: v.clone() for k, v in engine.module_state_dict().items()}
    engine.destroy()
    return state


@pytest.mark.parametrize("into", ("plain", "nvme"))
def test_checkpoint_with_nvme_offload_loads_at_another_world_size(tmp_path, into):
    (tmp_path / "swap").mkdir()
    saved = run_ranks(_save_nvme, world_size=2, args=(str(tmp_path / "ckpt"), str(tmp_path / "swap")), timeout=120)[0]
    swap = str(tmp_path / "swap") if into == "nvme" else None
    loaded = run_ranks(_load, world_size=1, args=(str(tmp_path / "ckpt"), swap), timeout=120)[0]
    assert saved.keys() == loaded.keys()
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k], rtol=1e-4, atol=1e-6)


def _bf16_param_offload(rank, world, path):
    import dsrun
    out = []
    for params, optimizer in (("cpu", "cpu"), ("cpu", "nvme"), ("nvme", "nvme"), (False, None)):
        cfg = nvme_config(3, world, path, params=params, optimizer=optimizer)
        cfg["bf16"] = {"enabled": True}
        engine, *_ = dsrun.initialize(model=make_model(), config=cfg)
        if params == "cpu":  # [Note: parameter offload]: a 16-bit host shard beside the fp32 master
            shard = engine.zero.weights.owned(0)
            assert shard.dtype == torch.bfloat16 and shard.device.type == "cpu"
            assert engine.zero.masters[0].dtype == torch.float32
        for x, y in make_data(world):
            for k in range(GAS):
                rows = slice((k * world + rank) * MICRO, (k * world + rank + 1) * MICRO)
                engine.backward(torch.nn.functional.mse_loss(engine(x[rows].bfloat16()).float(), y[rows]))
                engine.step()
        out.append(torch.cat([v.float().reshape(-1) for v in engine.module_state_dict().values()]))
        engine.destroy()
    return out


def test_bf16_parameter_offload_tracks_bf16_without_offload(tmp_path):
    """bf16 ZeRO-3 with parameter offload: 16-bit host shards (CPU) or fp32 masters in files (NVMe), copied
    into the device buffer at each gather, track bf16 without offload."""
    for *offloaded, plain in run_ranks(_bf16_param_offload, world_size=2, args=(str(tmp_path),), timeout=120):
        for state in offloaded:
            assert (state - plain).norm() / plain.norm() < 1e-2


def test_the_aio_section_drives_the_swapper_and_gds_is_named_inert(tmp_path):
    import warnings

    from dsrun.runtime.config import load_config
    cfg = {"train_micro_batch_size_per_gpu": 1, "aio": {"block_size": 65536, "queue_depth": 3, "thread_count": 2,
                                                        "overlap_events": False, "use_gds": True},
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        io = load_config(cfg, world_size=1).offload.io
    assert (io.block_size, io.queue_depth, io.thread_count, io.overlap_events) == (65536, 3, 2, False)
    assert [str(w.message) for w in caught if "aio" in str(w.message)] == [
        "aio.use_gds: accepted for DeepSpeed compatibility but ignored by dsrun (dsrun reads and writes NVMe through "
        "host memory (no GPUDirect Storage))"]


@pytest.fixture
def rank_signals():
    """A swapper sets SIGTERM and SIGXFSZ handlers for a rank; in pytest's own process they are put back."""
    import signal
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGXFSZ)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("direct", (False, True), ids=("buffered", "o_direct"))
def test_swapper_round_trip_and_a_truncated_file_is_an_error(tmp_path, rank_signals, direct):
    from dsrun.runtime.zero.swap import SwapError, TensorSwapper, direct_io_supported
    if direct and not direct_io_supported(str(tmp_path)):
        pytest.skip(f"no O_DIRECT on {tmp_path}")
    swapper = TensorSwapper(str(tmp_path), rank=0, block_size=8192, queue_depth=3, direct=direct)
    try:
        tensors = {"a": torch.randn(5003), "b": torch.randn(17).bfloat16(), "c": torch.arange(4096.0)}
        for key, t in tensors.items():
            swapper.write(key, t).wait()
        for key, t in tensors.items():
            back = torch.empty_like(t)
            swapper.read(key, back).wait()
            assert torch.equal(back, t), key
        os.truncate(swapper.path("a"), 4096)
        with pytest.raises(SwapError, match="read past the end of .*a.swp"):
            swapper.read("a", torch.empty(5003)).wait()
    finally:
        swapper.close()
    assert os.listdir(tmp_path) == []


def test_a_stale_folder_of_a_dead_process_is_swept(tmp_path, rank_signals):
    import socket

    from dsrun.runtime.zero.swap import TensorSwapper
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "dsrun-old" / "rank3"
    stale.mkdir(parents=True)
    (stale / "owner").write_text(f"{socket.gethostname()} {dead.stdout.strip()}\n")
    (stale / "bucket0.master.swp").write_bytes(b"x" * 100)
    swapper = TensorSwapper(str(tmp_path), rank=0)
    try:
        assert not (tmp_path / "dsrun-old").exists() and os.path.isdir(swapper.folder)
    finally:
        swapper.close()
    assert os.listdir(tmp_path) == []


def _cuda_offload(rank, world, path):
    import dsrun
    out = []
    for stage, params, optimizer in ((2, False, None), (2, False, "nvme"), (3, "cpu", "cpu"), (3, "nvme", "nvme")):
        cfg = nvme_config(stage, world, path, params=params, optimizer=optimizer)
        cfg["bf16"] = {"enabled": True}
        engine, *_ = dsrun.initialize(model=make_model(), config=cfg)
        for x, y in make_data(world):
            for k in range(GAS):
                rows = slice((k * world + rank) * MICRO, (k * world + rank + 1) * MICRO)
                xb, yb = x[rows].to(engine.device, torch.bfloat16), y[rows].to(engine.device)
                engine.backward(torch.nn.functional.mse_loss(engine(xb).float(), yb))
                engine.step()
        out.append(torch.cat([v.float().cpu().reshape(-1) for v in engine.module_state_dict().values()]))
        engine.destroy()
    return out


@pytest.mark.gpu
def test_cuda_nvme_and_parameter_offload_track_no_offload(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    world = min(torch.cuda.device_count(), 2)  # two ranks: the host shards' uploads feed real all-gathers
    for plain, *offloaded in run_ranks(_cuda_offload, world_size=world, args=(str(tmp_path),), start_method="spawn",
                                       backend="nccl"):
        for state in offloaded:
            assert (state - plain).norm() / plain.norm() < 1e-2
    assert os.listdir(tmp_path) == []


def test_a_pending_read_keeps_its_tensor_alive(tmp_path, rank_signals):
    """The pool threads write through the tensor's address: a temporary passed to `read` must not be freed
    before `wait()` (it was, and the threads wrote into freed heap memory: a segfault later)."""
    import gc
    import weakref

    from dsrun.runtime.zero.swap import TensorSwapper
    swapper = TensorSwapper(str(tmp_path), rank=0, block_size=4096, queue_depth=2)
    try:
        swapper.write("a", torch.arange(50000.0)).wait()
        target = torch.empty(50000)
        alive = weakref.ref(target)
        pending = swapper.read("a", target)
        del target
        gc.collect()
        assert alive() is not None
        pending.wait()
        gc.collect()
        assert alive() is None
    finally:
        swapper.close()
