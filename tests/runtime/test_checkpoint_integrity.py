"""Damaged checkpoints and failed saves (issue 10, defect 5): per-file checksums verified on load, clear
errors naming the file for corrupt, truncated, empty and missing files, damaged manifests and missing
tags, `latest` confined to its folder, partial save folders removed on failure and stale ones by the next
save; then the same damage through the real launcher (`dsrun --num_gpus 2`, gloo ranks) and the real
`dsrun-to-fp32` entry point."""
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dsrun.errors import DsrunError
from dsrun.runtime.checkpoint import CheckpointError, engine_io, integrity, to_fp32

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_ranks  # noqa: E402
from _fake_ckpt_engine import FakeEngine  # noqa: E402
from test_checkpoint import _batches, _engine, _params  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARD, STATES = "zero_shard_rank0.pt", "mp_rank_00_model_states.pt"


def _saved(root, tag="t", steps=2):
    engine = _engine()
    for x in _batches(steps):
        engine.train_micro_step(x)
    engine_io.save(engine, root, tag=tag)
    return engine


def flip_bytes(path, count=64):
    """Invert `count` bytes in the middle of the file (the issue's corruption: loads before, NaN after)."""
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def truncate(path, size=None):
    size = os.path.getsize(path) // 2 if size is None else size
    with open(path, "r+b") as f:
        f.truncate(size)


def _load_error(root, **kw):
    with pytest.raises(CheckpointError) as err:
        engine_io.load(_engine(seed=9), root, **kw)
    assert isinstance(err.value, DsrunError) and err.value.exit_code == 1
    return str(err.value)


# -- checksums -------------------------------------------------------------------------------------

def test_manifest_records_a_checksum_of_every_file(tmp_path):
    _saved(tmp_path)
    manifest = json.loads((tmp_path / "t" / "checkpoint.json").read_text())
    checksums = manifest["checksums"]
    assert checksums["algorithm"] == "crc32"
    assert sorted(checksums["files"]) == sorted(manifest["files"]) == [STATES, SHARD]
    for name, record in checksums["files"].items():
        assert record == integrity.file_record(str(tmp_path / "t" / name)), name  # hashed while writing


def test_checksum_of_large_blocks_written_beside_the_write(tmp_path):
    from dsrun.runtime.checkpoint.atomic import torch_save_synced
    path = str(tmp_path / "big.pt")
    record = torch_save_synced({"w": torch.randn(1 << 20), "small": torch.arange(3)}, path)  # a 4 MiB block
    assert record == integrity.file_record(path) and record["bytes"] > 4 << 20


def test_other_recorded_algorithms_are_verified_too(tmp_path):
    _saved(tmp_path)
    manifest_path = tmp_path / "t" / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    files = {name: {"bytes": os.path.getsize(tmp_path / "t" / name),
                    "digest": hashlib.sha256((tmp_path / "t" / name).read_bytes()).hexdigest()}
             for name in manifest["files"]}
    manifest["checksums"] = {"algorithm": "sha256", "files": files}
    manifest_path.write_text(json.dumps(manifest))
    engine_io.load(_engine(seed=3), tmp_path)
    flip_bytes(tmp_path / "t" / SHARD)
    assert "corrupt: sha256 checksum mismatch" in _load_error(tmp_path)


@pytest.mark.parametrize("name", [SHARD, STATES])
def test_flipped_bytes_are_a_checksum_mismatch_naming_the_file(tmp_path, name):
    _saved(tmp_path)
    flip_bytes(tmp_path / "t" / name)
    message = _load_error(tmp_path)
    assert str(tmp_path / "t" / name) in message and "corrupt: crc32 checksum mismatch" in message
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp_path)


@pytest.mark.parametrize("name", [SHARD, STATES])
def test_truncated_and_empty_files_are_reported_as_such(tmp_path, name):
    _saved(tmp_path)
    path = tmp_path / "t" / name
    full = os.path.getsize(path)
    truncate(path, 100)
    assert f"{path}: checkpoint file is truncated: 100 bytes, expected {full}" in _load_error(tmp_path)
    truncate(path, 0)
    assert f"{path}: checkpoint file is empty (zero length) (expected {full} bytes)" in _load_error(tmp_path)


def test_missing_file_names_it(tmp_path):
    _saved(tmp_path)
    os.remove(tmp_path / "t" / SHARD)
    assert "incomplete checkpoint: missing zero_shard_rank0.pt" in _load_error(tmp_path)


def test_checkpoint_without_checksums_loads_with_one_info_line(tmp_path, caplog):
    saved = _saved(tmp_path)
    manifest_path = tmp_path / "t" / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["checksums"]  # as written before checksums existed
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="dsrun.runtime.checkpoint"):
        for _ in range(2):
            b = _engine(seed=4)
            engine_io.load(b, tmp_path)
            assert all(torch.equal(v, b.module.state_dict()[k]) for k, v in _params(saved).items())
    notes = [r for r in caplog.records if "no checksums" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    # damage is still reported clearly, naming the file, without a checksum to compare
    truncate(tmp_path / "t" / SHARD)
    message = _load_error(tmp_path)
    assert str(tmp_path / "t" / SHARD) in message and "cannot be read (truncated or corrupt?)" in message
    truncate(tmp_path / "t" / SHARD, 0)
    assert "checkpoint file is empty (zero length)" in _load_error(tmp_path)


# -- manifest, tags, latest ------------------------------------------------------------------------

@pytest.mark.parametrize("damage, expected", [
    (lambda p: truncate(p), "checkpoint.json is not valid JSON (truncated or corrupt)"),
    (lambda p: truncate(p, 0), "checkpoint.json is empty (zero length)"),
    (lambda p: p.write_bytes(b"\xff\xfe{"), "checkpoint.json is not UTF-8 text"),
    (lambda p: p.write_text('{"format": "dsrun-checkpoint"}'), "missing or malformed files, shards, params"),
    (lambda p: p.write_text(p.read_text().replace('"zero_shard_rank0.pt"', '"../zero_shard_rank0.pt"')),
     "not a plain name inside the folder"),
])
def test_damaged_manifest_is_reported_naming_it(tmp_path, damage, expected):
    _saved(tmp_path)
    damage(tmp_path / "t" / "checkpoint.json")
    message = _load_error(tmp_path)
    assert str(tmp_path / "t" / "checkpoint.json") in message and expected in message


def test_missing_tag_lists_the_tags_present(tmp_path):
    _saved(tmp_path, tag="a")
    _saved(tmp_path, tag="b")
    (tmp_path / "b.tmp-1-dead").mkdir()  # an unfinished save is not a tag
    assert f"no checkpoint tag 'c' in {tmp_path}; tags present: a, b" in _load_error(tmp_path, tag="c")
    (tmp_path / "latest").write_text("gone")
    assert f"no checkpoint tag 'gone' in {tmp_path}; tags present: a, b" in _load_error(tmp_path)
    assert "the folder does not exist" in _load_error(tmp_path / "nowhere", tag="a")


@pytest.mark.parametrize("tag", ["../outside/t", "/abs/t", "sub/t", "..", "t\x00x", "t.tmp-1"])
def test_latest_cannot_leave_the_folder(tmp_path, tag):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _saved(outside)  # a loadable checkpoint one level up: must not be used
    _saved(root)
    (root / "latest").write_text(tag)
    message = _load_error(root)
    assert message.startswith(f"{root / 'latest'}: 'latest' names ")
    with pytest.raises(CheckpointError, match="'latest' names"):
        to_fp32.get_fp32_state_dict_from_zero_checkpoint(root)
    with pytest.raises(CheckpointError, match="invalid checkpoint tag"):
        engine_io.load(_engine(), root, tag="../outside/t")  # an explicit tag is held to the same rule


# -- failed saves and stale folders -----------------------------------------------------------------

def test_stale_folders_of_any_tag_are_removed_by_the_next_save(tmp_path):
    _saved(tmp_path, tag="b")
    _saved(tmp_path, tag="c")
    (tmp_path / "a.tmp-11-dead").mkdir()  # a crashed save of another tag
    (tmp_path / "a.tmp-11-dead" / SHARD).write_bytes(b"x" * 100)
    shutil.copytree(tmp_path / "b", tmp_path / "b.old-12-dead")  # crash after publishing, before cleanup
    os.rename(tmp_path / "c", tmp_path / "c.old-13-dead")  # crash between moving aside and publishing
    _saved(tmp_path, tag="new")
    # c.old is the only complete copy of tag c: kept, and still what tag c loads
    assert sorted(os.listdir(tmp_path)) == ["b", "c.old-13-dead", "latest", "new", "zero_to_fp32.py"]
    assert engine_io.load(_engine(), tmp_path, tag="c")[0] == str(tmp_path / "c.old-13-dead" / STATES)


# A child process whose file writes fail part way through a save: a file size limit (EFBIG, any system)
# or a full tmpfs (ENOSPC, in a private mount namespace where `unshare` is allowed). The first save fits;
# the second (same engine, one step later: momentum buffers added) does not.
FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, os, resource, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from _fake_ckpt_engine import FakeEngine
    from dsrun.runtime.checkpoint import CheckpointError, engine_io
    root = {root!r}
    torch.manual_seed(0)
    engine = FakeEngine(torch.nn.Linear(256, 512))
    engine_io.save(engine, root)
    used_before = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    engine.train_micro_step(torch.randn(2, 256))
    if {limit!r}:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit!r}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        engine_io.save(engine, root)
        error = None
    except CheckpointError as err:
        error = str(err)
    resource.setrlimit(resource.RLIMIT_FSIZE, resource.getrlimit(resource.RLIMIT_FSIZE)[1:] * 2)
    used_after = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    loaded = engine_io.load(FakeEngine(torch.nn.Linear(256, 512)), root)[0]
    print(json.dumps({{"error": error, "listing": sorted(os.listdir(root)), "freed": used_after == used_before,
                      "loaded": loaded}}))
""")


def _unshare_works():
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("how", ["file_size_limit", "full_tmpfs"])
def test_failed_save_removes_its_partial_folder(tmp_path, how):
    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    script = FULL_DISK_SCRIPT.format(tests=os.path.dirname(__file__), root=root,
                                     limit=600_000 if how == "file_size_limit" else 0)
    cmd = [sys.executable, "-c", script]
    if how == "full_tmpfs":
        if not _unshare_works():
            pytest.skip("no private mount namespace here (unshare refused); the file size limit case covers it")
        cmd = ["unshare", "--mount", "--map-root-user", "sh", "-c",
               f'mount -t tmpfs -o size=2m tmpfs "{root}" && exec "$0" "$@"', *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    reason = "File too large" if how == "file_size_limit" else "No space left on device"
    assert result["error"] is not None and f"cannot write checkpoint file: {reason}" in result["error"]
    assert ".tmp-" in result["error"] and result["error"].split(":")[0].endswith(".pt")  # names the file
    assert result["listing"] == ["global_step0", "latest", "zero_to_fp32.py"] and result["freed"]  # partial folder gone
    assert result["loaded"] == os.path.join(root, "global_step0", STATES)


def _save_with_rank1_disk_full(rank, world_size, root):
    import resource
    import signal
    engine = FakeEngine(torch.nn.Linear(128, 128), rank=rank, world_size=world_size)
    engine_io.save(engine, root, tag="ok")
    engine.train_micro_step(torch.randn(2, 128))
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        engine_io.save(engine, root, tag="full")
        return None
    except CheckpointError as err:
        return str(err), sorted(os.listdir(root))


def _load_rank_files(rank, world_size, root):
    engine = FakeEngine(torch.nn.Linear(128, 128), rank=rank, world_size=world_size)
    try:
        engine_io.load(engine, root)
        return None
    except CheckpointError as err:
        return str(err)


@pytest.mark.slow
def test_two_ranks_failed_save_and_corrupt_shard(tmp_path):
    root = str(tmp_path)
    r0, r1 = run_ranks(_save_with_rank1_disk_full, world_size=2, args=(root,))
    assert "zero_shard_rank1.pt: cannot write checkpoint file: File too large" in r1[0]
    assert r0[0].startswith("writing shard files failed on 1 rank(s): rank 1: CheckpointError:")
    assert r0[1] == ["latest", "ok", "zero_to_fp32.py"]  # rank 0 removed the partial folder once rank 1 had given up
    # each rank verifies the files it reads: only rank 1 reads its own (damaged) shard
    flip_bytes(os.path.join(root, "ok", "zero_shard_rank1.pt"))
    e0, e1 = run_ranks(_load_rank_files, world_size=2, args=(root,))
    assert e1.startswith(os.path.join(root, "ok", "zero_shard_rank1.pt") + ": checkpoint file is corrupt")
    assert e0.startswith(f"loading the checkpoint in {root} failed on 1 rank(s): rank 1: ")


# -- through the real launcher and the real converter ---------------------------------------------

TRAIN_SCRIPT = textwrap.dedent("""
    import sys, torch, dsrun
    mode, root = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "Adam", "params": {"lr": 0.01}}}
    engine, _, _, _ = dsrun.initialize(model=model, config=config)
    if mode == "save":
        loss = engine(torch.randn(2, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(root)
    else:
        engine.load_checkpoint(root)
        assert all(torch.isfinite(p).all() for p in engine.module.parameters())
""")

# mode -> (file damaged, how); "missing_tag" points `latest` at a tag that has no folder
DAMAGE = {"flip": ("global_step1/zero_shard_rank1.pt", flip_bytes),
          "truncate": (f"global_step1/{STATES}", truncate),
          "zero": ("global_step1/zero_shard_rank0.pt", lambda p: truncate(p, 0)),
          "missing_tag": ("latest", lambda p: p.write_text("global_step9"))}


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def _dsrun(tmp, *args):
    cmd = [sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", str(tmp / "train.py"), *args]
    done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=240, env=_env())
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def damaged_runs(tmp_path_factory):
    """Save under `dsrun --num_gpus 2`, then load a damaged copy of it for each DAMAGE: mode -> (what the
    message must name, exit code, output). The runs are shared by the tests below (each launch takes
    seconds)."""
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "train.py").write_text(TRAIN_SCRIPT)
    rc, out = _dsrun(tmp, "save", str(tmp / "ckpt"))
    assert rc == 0, out
    assert json.loads((tmp / "ckpt" / "global_step1" / "checkpoint.json").read_text())["checksums"]["files"]
    runs = {}
    for mode, (name, damage) in DAMAGE.items():
        copy = tmp / f"ckpt-{mode}"
        shutil.copytree(tmp / "ckpt", copy)
        damage(copy / name)
        named = f"no checkpoint tag 'global_step9' in {copy}" if mode == "missing_tag" else str(copy / name)
        runs[mode] = (named, *_dsrun(tmp, "load", str(copy)))
    return tmp, runs


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(DAMAGE))
def test_damaged_checkpoint_under_dsrun_exits_1(damaged_runs, mode):
    _, runs = damaged_runs
    named, rc, out = runs[mode]
    assert rc == 1, out
    assert "Traceback" not in out and "mmap" not in out


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(DAMAGE))
def test_damaged_checkpoint_under_dsrun_names_the_file(damaged_runs, mode):
    _, runs = damaged_runs
    named, rc, out = runs[mode]
    assert named in out, out


@pytest.mark.slow
def test_dsrun_to_fp32_refuses_a_corrupt_checkpoint(damaged_runs):
    tmp, runs = damaged_runs
    path = runs["flip"][0]
    cmd = [sys.executable, "-m", "dsrun.runtime.checkpoint.to_fp32", str(tmp / "ckpt-flip"), str(tmp / "out.bin")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 1
    assert done.stderr.startswith(f"dsrun-to-fp32: {path}: checkpoint file is corrupt: crc32 checksum mismatch")
    assert "Traceback" not in done.stderr and not (tmp / "out.bin").exists()
