"""Config layer: reference deepspeed-runtime.md 6.1 cases, strictness, auto, policies, loading."""
import base64
import json
import math

import pytest

from dsrun.runtime.config import (ConfigError, ConfigIgnoredKeyWarning, Device, DsConfig, LossScalePolicy,
                                  ShardingPolicy, diff_keys, load_config)

W = 2


def cfg(world_size=W, auto=None, **keys):
    base = {"train_micro_batch_size_per_gpu": 1} if not any(k.startswith("train") or k.startswith("gradient_acc")
                                                           for k in keys) else {}
    base.update(keys)
    return load_config(base, world_size=world_size, auto=auto)


def error(source, world_size=W, auto=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(source, world_size=world_size, auto=auto)
    assert info.value.exit_code == 2
    return info.value


# ---- batch triple (6.1) ------------------------------------------------------------------------------

T, M, G = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


@pytest.mark.parametrize("given", [(T, M, G), (T, M), (T, G), (M, G), (T,), (M,)])
def test_batch_32_16_1(given):
    values = {T: 32, M: 16, G: 1}
    c = load_config({k: values[k] for k in given}, world_size=W)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (32, 16, 1)


@pytest.mark.parametrize("given", [(T, M, G), (T, M), (T, G), (M, G)])
def test_batch_32_8_2(given):
    values = {T: 32, M: 8, G: 2}
    c = load_config({k: values[k] for k in given}, world_size=W)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (32, 8, 2)


def test_batch_33_17_all_given():
    e = error({T: 33, M: 17, G: 2})
    assert e.where == T and "33 != train_micro_batch_size_per_gpu 17 × gradient_accumulation_steps 2 × world_size 2" \
        in e.message


def test_batch_33_17_train_micro_says_which_divides():
    e = error({T: 33, M: 17})
    assert e.message == ("train_batch_size 33 is not divisible by train_micro_batch_size_per_gpu 17 × world_size 2 "
                         "(= 34)")


def test_batch_33_gas2_train_gas():
    e = error({T: 33, G: 2})
    assert "train_batch_size 33 is not divisible by gradient_accumulation_steps 2 × world_size 2 (= 4)" in e.message
    assert "32 or 36" in e.hint


def test_batch_gas_only_or_none():
    assert "set train_batch_size or train_micro_batch_size_per_gpu" in error({G: 2}).message
    assert "set train_batch_size or train_micro_batch_size_per_gpu" in error({}).message


def test_batch_32_18_1():
    error({T: 32, M: 18, G: 1})
    assert "not divisible by train_micro_batch_size_per_gpu 18" in error({T: 32, M: 18}).message


def test_batch_train_only_not_divisible_by_world():
    assert "not divisible by world_size 2" in error({T: 33}).message


@pytest.mark.parametrize("value", [0, -4])
def test_batch_non_positive(value):
    assert error({T: value}).where == T


def test_batch_wrong_type():
    e = error({T: "32x"})
    assert e.where == T and "expected an integer" in e.message
    assert load_config({T: 32.0}, world_size=W).train_batch_size == 32


def test_bad_world_size():
    assert error({T: 32}, world_size=0).where == "world_size"


# ---- strictness --------------------------------------------------------------------------------------

def test_unknown_top_level_key_did_you_mean():
    e = error({M: 1, "gradient_cliping": 1.0})
    assert e.where == "gradient_cliping" and "did you mean 'gradient_clipping'?" in e.message


def test_unknown_key_depth_three():
    e = error({M: 1, "zero_optimization": {"stage": 2, "offload_optimizer": {"devcie": "cpu"}}})
    assert str(e).startswith("zero_optimization.offload_optimizer.devcie: unknown key 'devcie' "
                             "(did you mean 'device'?)")


def test_unknown_key_depth_two_and_no_guess():
    assert "did you mean 'enabled'" in error({M: 1, "fp16": {"enable": True}}).message
    e = error({M: 1, "checkpoint": {"zzzzzz": 1}})
    assert e.where == "checkpoint.zzzzzz" and "accepted keys here" in e.hint


def test_removed_key_is_named():
    e = error({M: 1, "zero_optimization": {"grad_hooks": True}})
    assert e.where == "zero_optimization.grad_hooks" and "removed" in e.message


def test_wrong_types_name_path_and_type():
    e = error({M: 1, "zero_optimization": {"stage": 2, "overlap_comm": "yes"}})
    assert e.where == "zero_optimization.overlap_comm" and "expected a boolean" in e.message
    e = error({M: 1, "fp16": []})
    assert e.where == "fp16" and "expected an object" in e.message
    e = error({M: 1, "zero_optimization": {"offload_optimizer": {"device": "gpu"}, "stage": 2}})
    assert e.where == "zero_optimization.offload_optimizer.device" and "none, cpu, nvme" in e.message


def test_other_recognised_keys_are_accepted_and_kept():
    c = cfg(elasticity={"enabled": False, "max_train_batch_size": 8}, compile={"deepcompile": True},
            tensor_parallel={"autotp_size": 1}, vocabulary_size=32000, memory_breakdown=True,
            flops_profiler={"enabled": False}, comms_logger={"enabled": True, "prof_ops": ["all_reduce"]},
            aio={"block_size": 1048576, "thread_count": 2}, amp={"enabled": False, "opt_level": "O1"})
    assert c.raw["compile"] == {"deepcompile": True} and c.memory_breakdown is True
    assert c.top.aio.intra_op_parallelism == 2


def test_elasticity_enabled_is_refused():
    assert error({M: 1, "elasticity": {"enabled": True}}).where == "elasticity.enabled"


def test_duplicate_alias_and_field():
    e = error({M: 1, "zero_optimization": {"stage3_prefetch_bucket_size": 1, "prefetch_bucket_size": 2}})
    assert "same option" in e.message


# ---- zero (6.1) --------------------------------------------------------------------------------------

def test_zero_bool_deprecated():
    with pytest.warns(FutureWarning):
        assert cfg(zero_optimization=True).zero.stage == 1
    with pytest.warns(FutureWarning):
        assert cfg(zero_optimization=False).zero.stage == 0


def test_zero_stage_out_of_range():
    assert error({M: 1, "zero_optimization": {"stage": 4}}).where == "zero_optimization.stage"


def test_zero_deprecated_offload_fields():
    with pytest.warns(FutureWarning):
        c = cfg(zero_optimization={"stage": 3, "cpu_offload_param": True, "cpu_offload": True})
    assert c.zero.offload_param.device == "cpu" and c.zero.offload_optimizer.device == "cpu"
    assert c.offload.params is Device.CPU and c.offload.optimizer is Device.CPU
    with pytest.warns(FutureWarning):
        c = cfg(zero_optimization={"stage": 3, "stage3_gather_fp16_weights_on_model_save": True})
    assert c.zero.gather_16bit_weights_on_model_save is True


def test_zero_deprecated_and_new_together():
    e = error({M: 1, "zero_optimization": {"stage": 2, "cpu_offload": True, "offload_optimizer": {"device": "cpu"}}})
    assert e.where == "zero_optimization.cpu_offload"


def test_zero_aliases():
    c = cfg(zero_optimization={"stage": 3, "stage3_prefetch_bucket_size": 11, "stage3_param_persistence_threshold": 12,
                               "stage3_max_reuse_distance": 13, "stage3_gather_16bit_weights_on_model_save": True,
                               "stage3_max_live_parameters": 14})
    z = c.zero
    assert (z.prefetch_bucket_size, z.param_persistence_threshold, z.max_reuse_distance, z.max_live_parameters) == \
        (11, 12, 13, 14)
    assert z.gather_16bit_weights_on_model_save is True


@pytest.mark.parametrize("stage,overlap", [(0, False), (1, False), (2, False), (3, True)])
def test_overlap_comm_default(stage, overlap):
    c = cfg(zero_optimization={"stage": stage})
    assert c.zero.overlap is overlap and c.comm.overlap_comm is overlap
    assert cfg(zero_optimization={"stage": stage, "overlap_comm": not overlap}).comm.overlap_comm is (not overlap)


def test_offload_absent_null_empty():
    assert cfg(zero_optimization={"stage": 3}).zero.offload_param is None
    assert cfg(zero_optimization={"stage": 3, "offload_param": None}).zero.offload_optimizer is None
    c = cfg(zero_optimization={"stage": 3, "offload_param": {}, "offload_optimizer": {}})
    assert c.zero.offload_param.buffer_count == 5 and c.zero.offload_optimizer.buffer_count == 4
    assert c.offload.params is Device.NONE


@pytest.mark.parametrize("read,write,flag", [(False, False, False), (True, False, True), (False, True, True)])
def test_offload_pipeline_flag(read, write, flag):
    c = cfg(zero_optimization={"stage": 3, "offload_optimizer": {"pipeline_read": read, "pipeline_write": write}})
    assert c.zero.offload_optimizer.pipeline is flag


def test_offload_rules():
    assert "needs stage 3" in error({M: 1, "zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "cpu", "ratio": 0.5}}}).message
    with pytest.warns(ConfigIgnoredKeyWarning, match="zero_optimization.offload_param: "):  # inert below stage 3
        assert cfg(zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}}).offload.params is Device.NONE
    assert error({M: 1, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}).where == \
        "zero_optimization.offload_param.nvme_path"
    assert error({M: 1, "zero_optimization": {"stage": 3, "offload_optimizer": {"ratio": 1.5}}}).where == \
        "zero_optimization.offload_optimizer.ratio"


def test_offload_nvme_policy():
    c = cfg(zero_optimization={"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme", "ratio": 0.3},
                               "offload_param": {"device": "nvme", "nvme_path": "/nvme", "buffer_size": 1000,
                                                 "pin_memory": False}})
    assert c.offload.optimizer is Device.NVME and c.offload.params is Device.NVME
    assert (c.offload.nvme_path, c.offload.ratio, c.offload.buffer_size, c.offload.pin_memory) == \
        ("/nvme", 0.3, 1000, False)


# ---- gradient_allreduce_op, clipping (6.1) ------------------------------------------------------------

@pytest.mark.parametrize("given,expected", [("mean", "mean"), ("SUM", "sum"), (None, "mean")])
def test_allreduce_op_normalised(given, expected):
    c = cfg(gradient_allreduce_op=given) if given else cfg()
    assert c.comm.allreduce_op == expected


def test_allreduce_op_invalid_and_sum_stage3():
    e = error({M: 1, "gradient_allreduce_op": "max"})
    assert e.where == "gradient_allreduce_op" and "mean, sum" in e.message
    e = error({M: 1, "gradient_allreduce_op": "sum", "zero_optimization": {"stage": 3}})
    assert "not supported with ZeRO stage 3" in e.message


def test_prescale_rules_stage2():
    assert error({M: 1, "prescale_gradients": True, "zero_optimization": {"stage": 2}}).where == "prescale_gradients"
    assert error({M: 1, "gradient_predivide_factor": 2.0, "zero_optimization": {"stage": 2}}).where == \
        "gradient_predivide_factor"
    assert cfg(prescale_gradients=True, zero_optimization={"stage": 1}).comm.prescale_gradients is True


def test_gradient_clipping_default_and_off():
    assert cfg().gradient_clipping == 1.0
    assert cfg(gradient_clipping=0.0).gradient_clipping == 0.0
    assert error({M: 1, "gradient_clipping": -1}).where == "gradient_clipping"


# ---- fp16 / bf16 (6.1) -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, math.inf, math.nan, True, [], {}])
def test_fp16_loss_scale_rejected(value):
    e = error({M: 1, "fp16": {"enabled": True, "loss_scale": value}})
    assert e.where == "fp16.loss_scale"


@pytest.mark.parametrize("value,expected", [(0, 0.0), (1, 1.0), (2.0, 2.0), ("3", 3.0)])
def test_fp16_loss_scale_accepted(value, expected):
    assert cfg(fp16={"enabled": True, "loss_scale": value}).fp16.loss_scale == expected


@pytest.mark.parametrize("key", ["loss_scale_window", "min_loss_scale"])
@pytest.mark.parametrize("value", [0, -1])
def test_fp16_window_non_positive(key, value):
    assert error({M: 1, "fp16": {"enabled": True, key: value}}).where == f"fp16.{key}"
    cfg(fp16={"enabled": True, "loss_scale": 128, key: value})  # static: unused, accepted
    cfg(fp16={"enabled": False, key: value})  # disabled: accepted


@pytest.mark.parametrize("key", ["loss_scale_window", "min_loss_scale"])
@pytest.mark.parametrize("value", [True, math.inf, math.nan, "abc", None])
def test_fp16_window_bad_types(key, value):
    assert error({M: 1, "fp16": {"enabled": False, key: value}}).where == f"fp16.{key}"


def test_bf16_and_legacy_bfloat16():
    assert cfg(bf16={"enabled": True}).precision.param_dtype == "bf16"
    c = cfg(bfloat16={"enabled": True})
    assert c.bf16.enabled and c.precision.param_dtype == "bf16" and "bf16" in c.raw and "bfloat16" not in c.raw


def test_fp16_and_bf16_together():
    assert "cannot both be enabled" in error({M: 1, "fp16": {"enabled": True}, "bf16": {"enabled": True}}).message


def test_bf16_optimizer_states_needs_master():
    assert error({M: 1, "bf16": {"enabled": True, "bf16_optimizer_states": True}}).where == \
        "bf16.bf16_optimizer_states"


# ---- precision policies ------------------------------------------------------------------------------

def test_precision_fp32_default():
    p = cfg().precision
    assert (p.param_dtype, p.master_dtype, p.grad_accum_dtype, p.reduce_dtype, p.loss_scale) == \
        ("fp32", "fp32", "fp32", "fp32", None)


def test_precision_fp16_dynamic_and_static():
    p = cfg(fp16={"enabled": True, "initial_scale_power": 12, "hysteresis": 3}).precision
    assert (p.param_dtype, p.master_dtype, p.grad_accum_dtype, p.reduce_dtype) == ("fp16", "fp32", "fp32", "fp16")
    assert p.loss_scale == LossScalePolicy(dynamic=True, initial_scale_power=12, hysteresis=3)
    p = cfg(fp16={"enabled": True, "loss_scale": 128}).precision
    assert p.loss_scale.dynamic is False and p.loss_scale.static_scale == 128.0
    assert cfg(fp16={"enabled": True}, communication_data_type="FP32").precision.reduce_dtype == "fp32"


def test_precision_bf16_fp32_accumulation_and_overrides():
    p = cfg(bf16={"enabled": True}).precision
    assert (p.param_dtype, p.master_dtype, p.grad_accum_dtype, p.reduce_dtype) == ("bf16", "fp32", "fp32", "fp32")
    with pytest.warns(ConfigIgnoredKeyWarning, match="data_types.grad_accum_dtype"):  # masters' .grad: fp32
        p = cfg(bf16={"enabled": True}, data_types={"grad_accum_dtype": "bf16"},
                communication_data_type="bf16").precision
    assert (p.grad_accum_dtype, p.reduce_dtype) == ("fp32", "bf16")


def test_precision_conflicts():
    assert error({M: 1, "bf16": {"enabled": True}, "data_types": {"param_dtype": "fp16"}}).where == \
        "data_types.param_dtype"
    with pytest.warns(ConfigIgnoredKeyWarning, match="data_types.grad_accum_dtype"):  # fp32 model: accepted
        assert cfg(data_types={"grad_accum_dtype": "bf16"}).precision.grad_accum_dtype == "fp32"
    assert error({M: 1, "communication_data_type": "int8"}).where == "communication_data_type"
    assert error({M: 1, "fp16": {"enabled": True, "fp16_master_weights_and_grads": True}}).where == \
        "fp16.fp16_master_weights_and_grads"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_policy_matrix(stage, precision):
    keys = {"zero_optimization": {"stage": stage}}
    if precision != "fp32":
        keys[precision] = {"enabled": True}
    c = cfg(**keys)
    assert c.sharding == ShardingPolicy.from_stage(stage) and c.zero_optimization_stage == stage
    assert c.precision.param_dtype == precision and c.precision.master_dtype == "fp32"
    assert (c.precision.loss_scale is not None) is (precision == "fp16")
    assert c.offload.optimizer is Device.NONE and c.comm.reduce_bucket_size == 500_000_000


# ---- optimizer / scheduler / checkpoint --------------------------------------------------------------

@pytest.mark.parametrize("name,canonical", [("Adam", "adam"), ("ADAMW", "adamw"), ("sgd", "sgd"),
                                            ("Adagrad", "adagrad"), ("Lamb", "lamb"), ("RMSprop", "RMSprop")])
def test_optimizer_types(name, canonical):
    c = cfg(optimizer={"type": name, "params": {"lr": 0.1}})
    assert c.optimizer.name == canonical and c.optimizer.type == name and c.optimizer.params == {"lr": 0.1}


def test_optimizer_unsupported_and_unknown():
    e = error({M: 1, "optimizer": {"type": "OneBitAdam"}})
    assert "dsrun does not support" in e.message and e.where == "optimizer.type"
    e = error({M: 1, "optimizer": {"type": "AdamWW"}})
    assert "did you mean 'AdamW'" in e.message
    e = error({M: 1, "optimizer": {"type": "rmsprop"}})  # torch names are case-sensitive
    assert "did you mean 'RMSprop'" in e.message
    assert "missing required key 'type'" in error({M: 1, "optimizer": {"params": {}}}).message
    assert error({M: 1, "optimizer": {"type": "Adam", "params": {"max_grad_norm": 1}}}).hint.startswith(
        "use the top-level 'gradient_clipping'")


def test_scheduler_types():
    assert cfg(scheduler={"type": "WarmupLR", "params": {}}).scheduler.type == "WarmupLR"
    assert cfg(scheduler={"type": "CosineAnnealingLR", "params": {"T_max": 3}}).scheduler.is_torch
    e = error({M: 1, "scheduler": {"type": "WarmupCosineLr"}})
    assert "did you mean 'WarmupCosineLR'" in e.message and e.where == "scheduler.type"


def test_checkpoint_tag_validation():
    assert cfg().checkpoint.tag_validation == "Warn"
    assert cfg(checkpoint={"tag_validation": "fail"}).checkpoint.tag_validation == "Fail"
    e = error({M: 1, "checkpoint": {"tag_validation": "foo"}})
    assert e.where == "checkpoint.tag_validation" and "Ignore, Warn, Fail" in e.message
    c = cfg(checkpoint={"load_universal": True, "parallel_write": {"pipeline_stage": True}})
    assert c.checkpoint.load_universal and c.checkpoint.parallel_write.pipeline_stage
    assert error({M: 1, "checkpoint": {"parallel_write": {"pipeline_stage": "yes"}}}).where == \
        "checkpoint.parallel_write.pipeline_stage"


def test_other_sections_defaults():
    c = cfg(pipeline={"activation_checkpoint_interval": 2}, activation_checkpointing={"partition_activations": True},
            tensorboard={"enabled": True, "output_path": "/tmp/tb"}, steps_per_print=10)
    assert c.pipeline["stages"] == "auto" and c.pipeline.get("activation_checkpoint_interval") == 2
    assert c.activation_checkpointing.partition_activations and c.tensorboard.job_name == "DeepSpeedJobName"
    assert c.monitors_enabled and c.steps_per_print == 10 and cfg().steps_per_print == 0
    assert c.wandb.project == "deepspeed" and c.comet.samples_log_interval == 100
    assert c.pipeline.extra_warmup == 0 and cfg(pipeline={"extra_warmup": 2}).pipeline.extra_warmup == 2
    assert error({M: 1, "pipeline": {"extra_warmup": -1}}).where == "pipeline.extra_warmup"


# ---- fingerprint -------------------------------------------------------------------------------------

def test_fingerprint_stable_and_canonical():
    a = cfg(zero_optimization={"stage": 3, "stage3_prefetch_bucket_size": 5}, bfloat16={"enabled": True})
    b = cfg(bf16={"enabled": True}, zero_optimization={"prefetch_bucket_size": 5.0, "stage": 3})
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert json.loads(json.dumps(a.raw)) == a.raw
    c = cfg(zero_optimization={"stage": 2}, bf16={"enabled": True})
    assert c.fingerprint() != a.fingerprint()
    assert diff_keys(a.raw, c.raw) == ["zero_optimization"]
    assert diff_keys({"a": 1}, {"b": 1}) == ["a", "b"]


def test_dsconfig_is_frozen_and_reloadable():
    c = cfg(train_batch_size=8)
    with pytest.raises(Exception):
        c.train_batch_size = 3
    assert load_config(c, world_size=W) is c
    assert load_config(c, world_size=4).train_micro_batch_size_per_gpu == 2
    assert isinstance(c, DsConfig)


def test_input_not_mutated():
    data = {T: "auto", M: 2, "optimizer": {"type": "Adam", "params": {"lr": "auto"}}}
    snapshot = json.dumps(data)
    load_config(data, world_size=W, auto={"lr": 0.5})
    assert json.dumps(data) == snapshot


# ---- loading -----------------------------------------------------------------------------------------

def test_json_file_with_comments(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{\n  // micro\n  "train_micro_batch_size_per_gpu": 4, /* block */\n "fp16": {"enabled": true},\n}\n')
    c = load_config(str(p), world_size=W)
    assert c.train_batch_size == 8 and c.fp16.enabled and c.source == str(p)
    assert load_config(p, world_size=W).train_batch_size == 8  # PathLike


def test_json_decode_error_names_file_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n "train_batch_size": 8,\n "x": [1}\n')  # invalid for JSON and for hjson alike
    e = error(str(p))
    assert e.where.startswith(f"{p}:3:") and "invalid JSON" in e.message


def test_json_duplicate_keys(tmp_path):
    p = tmp_path / "dup.json"
    p.write_text('{"train_batch_size": 8, "fp16": {"enabled": true, "enabled": false}, "train_batch_size": 8}')
    assert "duplicate keys" in error(str(p)).message


def test_yaml_file_and_duplicates(tmp_path):
    p = tmp_path / "ds.yaml"
    p.write_text("train_batch_size: 16\nzero_optimization:\n  stage: 2\n")
    assert load_config(str(p), world_size=W).train_micro_batch_size_per_gpu == 8
    d = tmp_path / "dup.yml"
    d.write_text("train_batch_size: 16\nbf16:\n  enabled: true\ntrain_batch_size: 8\n")
    e = error(str(d))
    assert e.where == f"{d}:4" and "duplicate key" in e.message
    b = tmp_path / "bad.yaml"
    b.write_text("train_batch_size: [1\n")
    assert error(str(b)).where.startswith(str(b))
    s = tmp_path / "scalar.yaml"
    s.write_text("- 1\n")
    assert "top level" in error(str(s)).message


def test_base64_and_missing_file():
    text = base64.urlsafe_b64encode(json.dumps({T: 8, "bf16": {"enabled": True}}).encode()).decode()
    c = load_config(text, world_size=W)
    assert c.train_batch_size == 8 and c.bf16.enabled and c.source == "<base64>"
    assert load_config(text.rstrip("="), world_size=W).train_batch_size == 8
    assert "not found" in error("/nonexistent/ds.json").message
    assert "base64" in error("notaconfig").message
    assert error(42).where == "config"


def test_file_errors_name_file_line_and_key(tmp_path):
    y = tmp_path / "ds.yaml"
    y.write_text("train_batch_size: 16\nzero_optimization:\n  stage: 2\n  offload_optimizer:\n    devcie: cpu\n")
    e = error(str(y))
    assert str(e).startswith(f"{y}:5: zero_optimization.offload_optimizer.devcie: unknown key 'devcie' "
                             "(did you mean 'device'?)")
    assert e.key_path == "zero_optimization.offload_optimizer.devcie"
    j = tmp_path / "ds.json"
    j.write_text('{\n  "train_batch_size": 16,\n  "fp16": {\n    "enabled": true,\n    "loss_scale": -1\n  }\n}\n')
    assert error(str(j)).where == f"{j}:5: fp16.loss_scale"
    j.write_text('{"gradient_accumulation_steps": 2}')
    assert error(str(j)).where == f"{j}: train_batch_size"


def test_getattr_delegation_and_compat_class():
    from dsrun.runtime.config import DeepSpeedConfig

    c = cfg(memory_breakdown=True)
    assert c.memory_breakdown is True and c.dataloader_drop_last is False and c.zero_optimization is c.zero
    with pytest.raises(AttributeError):
        c.not_a_key
    d = DeepSpeedConfig({"train_batch_size": 8, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                         "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}})
    assert (d.train_batch_size, d.train_micro_batch_size_per_gpu, d.zero_optimization_stage) == (8, 8, 2)
    assert d.zero_enabled and d.bfloat16_enabled and not d.fp16_enabled and d.optimizer_name == "adamw"
    assert d.sharding.gradients  # everything else through the DsConfig


def test_deprecation_warnings_name_the_config_not_dsrun_source():
    """Like the ignored-key warnings, a deprecated key's warning is located at 'dsrun config', so Python
    prints no line of dsrun's own source under it."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg(zero_optimization={"stage": 2, "cpu_offload": True})
    [w] = [w for w in caught if "cpu_offload is deprecated" in str(w.message)]
    assert w.filename == "dsrun config" and str(w.message).startswith("zero_optimization.cpu_offload")
