"""DeepSpeed 0.19.8 checkpoints in dsrun: `load_checkpoint` continues DeepSpeed's run, `dsrun-to-fp32` equals
DeepSpeed's own `zero_to_fp32`.

The checkpoints under fixtures/deepspeed_0.19.8/ were made by DeepSpeed 0.19.8 itself (2 ranks, CPU, gloo) with
fixtures/make_ds_checkpoints.py, which also recorded the losses of DeepSpeed's run after the save
(`expected.json`) and DeepSpeed's `zero_to_fp32` output (`ds_fp32.pt`, where DeepSpeed's converter reads the
variant). Regenerate them with the command in that script's docstring.
"""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dsrun.runtime.checkpoint import CheckpointError, engine_io, to_fp32
from dsrun.runtime.checkpoint.deepspeed_format import DeepSpeedCheckpoint, is_deepspeed_folder

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(HERE, "fixtures", "deepspeed_0.19.8")
SCRIPT = os.path.join(HERE, "scripts", "continue_ds_checkpoint.py")
VARIANTS = sorted(v for v in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, v, "expected.json")))
# fp32 continues DeepSpeed's run bit for bit here; bf16 within 1e-3 (DeepSpeed reduces gradients in bf16)
TOLERANCE = {"fp32": 1e-6, "bf16": 3e-3, "fp16": 3e-3}
# DeepSpeed 0.19.8's FP16_UnfusedOptimizer (fp16, ZeRO-0, a non-fused optimizer) has no `loss_scaler`
# attribute, so the engine's backward does not scale the loss, yet its step divides the gradients by the
# loss scale (256 here): DeepSpeed's run trains on gradients / 256 (its saved exp_avg is 1/256 of the fp32
# run's). dsrun loads that state as saved and trains on true gradients, so only the first loss, computed
# with the loaded weights before any update, is DeepSpeed's.
FIRST_LOSS_ONLY = {"fp16_zero0"}
CROSS = ["fp32_zero3:1", "fp32_zero0:2", "fp32_zero2:3"]  # DeepSpeed's stage -> dsrun continues at another

sys.path.insert(0, os.path.join(HERE, "fixtures"))
import ds_fixture_common as common  # noqa: E402


def _expected(variant):
    with open(os.path.join(FIXTURES, variant, "expected.json")) as f:
        return json.load(f)


def test_fixtures_are_real_deepspeed_checkpoints():
    assert {"fp32_zero0", "fp32_zero1", "fp32_zero2", "fp32_zero3", "bf16_zero0", "bf16_zero1", "bf16_zero2",
            "bf16_zero3", "bf16acc32_zero1"} <= set(VARIANTS)
    for variant in VARIANTS:
        record = _expected(variant)
        assert record["deepspeed"] == "0.19.8" and record["world_size"] == 2
        assert (open(os.path.join(FIXTURES, variant, "latest")).read().strip()
                == f"global_step{common.STEPS_BEFORE}")
        assert is_deepspeed_folder(os.path.join(FIXTURES, variant, f"global_step{common.STEPS_BEFORE}"))


@pytest.mark.parametrize("world_size", [2, 1])
def test_dsrun_continues_deepspeed_runs(tmp_path, world_size):
    """Each checkpoint loads under `dsrun --num_gpus N` and the next steps' losses are DeepSpeed's."""
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ENV_FILE", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHONPATH=REPO, HOME=str(tmp_path), OMP_NUM_THREADS="1")
    saved = tmp_path / "saved"
    done = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", str(world_size), SCRIPT,
                           "--fixtures", FIXTURES, "--variants", ",".join(VARIANTS), "--out", str(out),
                           "--save", str(saved), "--cross", ",".join(CROSS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    for variant in VARIANTS:
        expected, got = _expected(variant), results[variant]
        assert got["global_steps"] == common.STEPS_BEFORE, variant
        assert got["client_state"] == {"epoch": 7, "note": variant}, variant
        tol = TOLERANCE[common.VARIANTS[variant]["dtype"]]
        steps = 1 if variant in FIRST_LOSS_ONLY else len(expected["losses_after"])
        assert got["losses"][:steps] == pytest.approx(expected["losses_after"][:steps], rel=tol, abs=tol), variant
        # the control: without the checkpoint the model would start elsewhere
        assert abs(got["fresh_loss"] - expected["losses_after"][0]) > 10 * tol, variant
    for item in CROSS:  # another ZeRO stage than DeepSpeed's: the same run, to fp32 rounding
        expected = _expected(item.split(":")[0])["losses_after"]
        assert results[item]["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-6), item
    if world_size == 2:
        _check_converter_script(saved / "bf16_zero3", tmp_path / "bf16_zero3.bin")
        _check_converter_script(saved / "fp32_zero1", tmp_path / "fp32_zero1.bin")


def _check_converter_script(save_dir, output):
    """dsrun's checkpoint directory carries zero_to_fp32.py, which needs only torch and gives dsrun-to-fp32's
    state dict (here from checkpoints sharded over 2 ranks)."""
    script = save_dir / "zero_to_fp32.py"
    tree = ast.parse(script.read_text())
    imports = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    imports |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imports <= {"argparse", "collections", "json", "os", "sys", "torch"}, imports
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), str(save_dir), str(output)], cwd=save_dir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    theirs = torch.load(output, weights_only=True)
    ours = to_fp32.get_fp32_state_dict_from_zero_checkpoint(save_dir)
    assert list(theirs) == list(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_fp32_equals_deepspeed_zero_to_fp32(variant):
    folder = os.path.join(FIXTURES, variant)
    tag_dir = os.path.join(folder, f"global_step{common.STEPS_BEFORE}")
    ours = to_fp32.get_fp32_state_dict_from_zero_checkpoint(folder)
    assert set(ours) == set(common.build_model().state_dict())
    assert all(v.dtype == torch.float32 for v in ours.values())
    reference = os.path.join(folder, "ds_fp32.pt")
    if os.path.exists(reference):
        theirs = torch.load(reference, weights_only=True)
    else:
        # DeepSpeed's zero_to_fp32 refuses stage 0 and BF16_Optimizer checkpoints
        assert _expected(variant)["zero_to_fp32"].startswith("failed"), variant
        theirs = _stage0_masters(tag_dir) if common.VARIANTS[variant]["stage"] == 0 else {}
    # at ZeRO-1 DeepSpeed's converter leaves frozen parameters out; dsrun takes them from the module state
    assert set(theirs) <= set(ours)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value.float()), (variant, name)
    if common.VARIANTS[variant]["stage"] < 3:  # DeepSpeed's working weights are the masters, rounded
        module = DeepSpeedCheckpoint(tag_dir).module_state
        for name, value in module.items():
            assert torch.equal(ours[name].to(value.dtype), value), (variant, name)


def _stage0_masters(tag_dir):
    """DeepSpeed's own fp32 weights of a stage-0 checkpoint, read with plain torch.load (DeepSpeed pickles
    no objects of its own in these files): the module, or the fp16/bf16 optimizer's fp32 copies."""
    states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)
    module = {k: v.float() for k, v in states["module"].items()}
    masters = (states["optimizer"] or {}).get("fp32_groups")
    if masters:
        trained = ["inp.weight", "inp.bias", "out.weight", "out.bias"]
        module.update(zip(trained, masters[0]))
    return module


def test_dsrun_to_fp32_console_script_reads_deepspeed(tmp_path):
    output = tmp_path / "model.bin"
    done = subprocess.run([sys.executable, "-m", "dsrun.runtime.checkpoint.to_fp32",
                           os.path.join(FIXTURES, "bf16_zero3"), str(output)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert done.returncode == 0, done.stderr
    state = torch.load(output, weights_only=True)
    reference = torch.load(os.path.join(FIXTURES, "bf16_zero3", "ds_fp32.pt"), weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    model = common.build_model()
    model.load_state_dict(state)  # complete: every parameter and buffer


def test_optimizer_states_are_deepspeeds_at_every_stage():
    """exp_avg / exp_avg_sq / step rebuilt from stage 1, 2 and 3 partitions equal stage 0's whole tensors
    (all four runs are the same training run)."""
    whole = DeepSpeedCheckpoint(os.path.join(FIXTURES, "fp32_zero0", "global_step3"))
    for stage in (1, 2, 3):
        parted = DeepSpeedCheckpoint(os.path.join(FIXTURES, f"fp32_zero{stage}", "global_step3"))
        assert parted.zero_stage == stage and parted.world_size == 2
        assert parted.groups[0]["state"] == whole.groups[0]["state"] == {"step": 3.0}
        for name in ("inp.weight", "out.bias"):
            for key in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.allclose(parted.read_full(name, key), whole.read_full(name, key), atol=1e-6), \
                    (stage, name, key)
        assert parted.frozen == whole.frozen == {"frozen.weight", "frozen.bias"}


def _copy(variant, tmp_path):
    target = tmp_path / variant
    shutil.copytree(os.path.join(FIXTURES, variant), target)
    return target


def test_missing_rank_file_names_the_folder(tmp_path):
    folder = _copy("fp32_zero2", tmp_path)
    (folder / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        to_fp32.get_fp32_state_dict_from_zero_checkpoint(folder)
    assert "missing" in str(err.value) and "global_step3" in str(err.value)


def test_corrupt_deepspeed_file_names_the_file(tmp_path):
    folder = _copy("bf16_zero3", tmp_path)
    path = folder / "global_step3" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as err:
        DeepSpeedCheckpoint(str(folder / "global_step3"))
    assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in str(err.value)


def test_reading_needs_no_deepspeed():
    """DeepSpeed pickles its own classes (loss scaler, ZeroStageEnum) into optimizer files; dsrun reads them
    without importing deepspeed."""
    before = set(sys.modules)
    checkpoint = DeepSpeedCheckpoint(os.path.join(FIXTURES, "fp32_zero2", "global_step3"))
    assert not any(m == "deepspeed" or m.startswith("deepspeed.") for m in set(sys.modules) - before)
    assert checkpoint.loss_scaler == {}  # fp32: DeepSpeed's scale 1 is not carried over


def test_engine_io_dispatches_on_folder_contents(tmp_path):
    assert engine_io.deepspeed_format.is_deepspeed_folder(os.path.join(FIXTURES, "fp32_zero0", "global_step3"))
    assert not is_deepspeed_folder(str(tmp_path))


def test_model_parallel_checkpoints_are_refused(tmp_path):
    folder = _copy("fp32_zero2", tmp_path)
    shutil.copy(folder / "global_step3" / "mp_rank_00_model_states.pt", folder / "global_step3" /
                "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match="tensor/model parallel .* dsrun reads only data-parallel"):
        DeepSpeedCheckpoint(str(folder / "global_step3"))


def test_fp16_loss_scale_and_unfused_optimizer_state_are_deepspeeds():
    """fp16: the dynamic loss scale comes from DeepSpeed's pickled DynamicLossScaler (ZeRO) or the unfused
    optimizer's dict (ZeRO-0); the ZeRO-0 moments are DeepSpeed's, 1/256 of the correctly scaled run's."""
    zero2 = DeepSpeedCheckpoint(os.path.join(FIXTURES, "fp16_zero2", "global_step3"))
    assert zero2.loss_scaler == {"cur_scale": 256, "cur_iter": 3, "last_overflow_iter": -1, "cur_hysteresis": 2}
    zero0 = DeepSpeedCheckpoint(os.path.join(FIXTURES, "fp16_zero0", "global_step3"))
    assert zero0.loss_scaler == {"cur_scale": 256, "cur_iter": 3, "last_overflow_iter": -1}
    ratio = zero2.read_full("out.bias", "exp_avg") / zero0.read_full("out.bias", "exp_avg")
    assert torch.allclose(ratio, torch.full_like(ratio, 256.0), rtol=0.05)


def test_config_saved_as_a_path(tmp_path):
    """DeepSpeed saves `ds_config` as the user passed it: a dict, or the config file's path."""
    folder = _copy("fp16_zero2", tmp_path)
    path = folder / "global_step3" / "mp_rank_00_model_states.pt"
    states = torch.load(path, weights_only=False)
    states["ds_config"] = "/elsewhere/ds_config.json"
    torch.save(states, path)
    checkpoint = DeepSpeedCheckpoint(str(folder / "global_step3"))
    assert checkpoint.loss_scaler["cur_scale"] == 256  # fp16 told by the weights' dtype
    assert checkpoint.dsrun_states()["scalar_state"]["counters"]["micro_steps"] == 0


def _large_zero2_folder(tag_dir, numel):
    """A ZeRO-2 DeepSpeed checkpoint of 2 ranks holding one fp32 parameter `big.weight` of `numel` elements
    (a multiple of 4: no padding), with the fp32_zero2 fixture's keys; master = 0, 1, 2, ...,
    exp_avg = 2 x master, exp_avg_sq = 3 x master."""
    from dsrun.runtime.checkpoint.ds_files import load_deepspeed_file
    fixture = os.path.join(FIXTURES, "fp32_zero2", "global_step3")
    states = load_deepspeed_file(os.path.join(fixture, "mp_rank_00_model_states.pt"), mmap=False)
    optim = load_deepspeed_file(os.path.join(fixture, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), mmap=False)
    master = torch.arange(numel, dtype=torch.float32)
    states.update(module={"big.weight": master.view(4, -1).clone()}, buffer_names=[], frozen_param_shapes={},
                  frozen_param_fragments={}, shared_params={},
                  param_shapes=[{"big.weight": torch.Size([4, numel // 4])}])
    os.makedirs(tag_dir)
    torch.save(states, os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    inner = {k: v for k, v in optim["optimizer_state_dict"].items() if k not in ("loss_scaler", "param_slice_mappings")}
    for rank, part in enumerate(master.chunk(2)):
        base = dict(inner["base_optimizer_state"])
        base["state"] = {0: {"step": torch.tensor(3.0), "exp_avg": 2 * part, "exp_avg_sq": 3 * part}}
        rank_state = dict(inner, single_partition_of_fp32_groups=[part.clone()], base_optimizer_state=base,
                          param_alignment_paddings=[[0]], group_paddings=[0], partition_count=[2])
        torch.save({"optimizer_state_dict": rank_state},
                   os.path.join(tag_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))


def test_opening_a_deepspeed_checkpoint_copies_only_what_is_read(tmp_path):
    """Each rank of a loading job reads its own ranges of the DeepSpeed partitions. Opening the folder must
    not join them: that put the whole model's fp32 weights and moments in every rank's memory (8 ranks of
    a node, 7B parameters: 8 x 84 GB). A 16M-parameter checkpoint (192 MB of fp32 state) is opened in a
    fresh process, a range across the two ranks' partitions is read, and the process's resident memory may
    grow by far less than the state."""
    numel = 1 << 24
    tag = tmp_path / "global_step3"
    _large_zero2_folder(str(tag), numel)
    code = (
        "import sys, torch\n"
        "from dsrun.runtime.checkpoint.deepspeed_format import DeepSpeedCheckpoint\n"
        "def resident():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "before = resident()\n"
        "ckpt = DeepSpeedCheckpoint(sys.argv[1])\n"
        "half = ckpt.shapes['big.weight'][0] * ckpt.shapes['big.weight'][1] // 2\n"
        "values = {k: ckpt.read('big.weight', k, half - 3, half + 3) for k in ('master', 'exp_avg', 'exp_avg_sq')}\n"
        "expected = torch.arange(half - 3, half + 3, dtype=torch.float32)\n"
        "assert torch.equal(values['master'], expected), values['master']\n"
        "assert torch.equal(values['exp_avg'], 2 * expected) and torch.equal(values['exp_avg_sq'], 3 * expected)\n"
        "print((resident() - before) // 2 ** 20)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tag)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    grown_mib = int(out.stdout.split()[-1])
    assert grown_mib < 48, f"opening and reading 6 elements grew the process by {grown_mib} MiB of 192 MiB of state"
