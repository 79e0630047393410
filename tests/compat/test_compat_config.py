"""Configs DeepSpeed accepts load in dsrun (issue 16 part 4): hjson syntax, `Infinity`, keys DeepSpeed
accepts that dsrun ignores (one warning naming the key), unknown keys still an error with a did-you-mean;
and the data_types defects (part 3): grad_accum_dtype, buffer_dtype."""
import json
import warnings

import pytest
import torch

from dsrun.errors import ConfigError
from dsrun.runtime.config import ConfigIgnoredKeyWarning, Device, load_config
from dsrun.runtime.precision import cast_buffers

BASE = {"train_batch_size": 4}


def _ignored(record):
    return [str(w.message) for w in record if issubclass(w.category, ConfigIgnoredKeyWarning)]


def test_hjson_file_loads(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text("{\n  # DeepSpeed reads this with hjson\n  train_batch_size: 8\n"
                    "  fp16: {enabled: true, loss_scale: 0,}\n  zero_optimization: {\n    stage: 1\n  }\n}\n")
    cfg = load_config(str(path), world_size=2)
    assert (cfg.train_batch_size, cfg.fp16.enabled, cfg.zero.stage) == (8, True, 1)
    (tmp_path / "ds.hjson").write_text("{\n train_micro_batch_size_per_gpu: 2\n}\n")
    assert load_config(str(tmp_path / "ds.hjson"), world_size=2).train_batch_size == 4


def test_hjson_errors_name_the_line_and_the_key(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text("{\n  train_batch_size: 8\n  zero_optimization: {stage: 7}\n}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.where == f"{path}:3: zero_optimization.stage"


def test_steps_per_print_infinity_means_never(tmp_path):
    path = tmp_path / "accelerate.json"
    path.write_text(json.dumps(dict(BASE, steps_per_print=float("inf"))))  # writes `Infinity`
    assert "Infinity" in path.read_text()
    hjson = tmp_path / "hjson.json"
    hjson.write_text('{\n  train_batch_size: 4\n  "steps_per_print": Infinity,\n}\n')  # hjson: "Infinity,"
    for source in (str(path), str(hjson), dict(BASE, steps_per_print=float("inf")),
                   dict(BASE, steps_per_print="inf")):
        assert load_config(source).steps_per_print == 0  # 0 = never
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(dict(BASE, steps_per_print=float("-inf")))


def test_inert_keys_are_accepted_with_one_warning_naming_them():
    config = dict(BASE, cuda_visible_devices="0,1", optimizer={"type": "Adam", "torch_adam": True, "params": {}},
                  zero_optimization={"stage": 0, "offload_param": {"device": "cpu"}},
                  compile={"deepcompile": True}, amp={"enabled": False}, flops_profiler={"enabled": False})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # the default filter: each message once
        cfg = load_config(config)
        load_config(config)
    messages = _ignored(record)
    assert sorted(m.split(":")[0] for m in messages) == ["compile", "cuda_visible_devices", "optimizer.torch_adam",
                                                          "zero_optimization.offload_param"]
    assert all("ignored by dsrun" in m for m in messages)
    assert cfg.offload.params is Device.NONE and cfg.zero.offload_param_device == "none"
    assert "cuda_visible_devices" not in cfg.raw and "torch_adam" not in cfg.raw["optimizer"]


def test_default_valued_inert_keys_are_silent():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_config(dict(BASE, amp={"enabled": False}, sparse_gradients=False, torch_autocast={"enabled": False},
                         zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}))
    assert _ignored(record) == []


def test_unknown_keys_are_still_errors_with_did_you_mean():
    with pytest.raises(ConfigError) as info:
        load_config(dict(BASE, cuda_visible_device="0"))
    assert info.value.where == "cuda_visible_device" and "did you mean 'cuda_visible_devices'" in info.value.message
    with pytest.raises(ConfigError) as info:
        load_config(dict(BASE, optimizer={"type": "Adam", "torch_adm": True}))
    assert info.value.where == "optimizer.torch_adm" and "'torch_adam'" in info.value.message


def test_config_reads_as_a_dict():
    cfg = load_config(dict(BASE, fp16={"enabled": True}))
    assert cfg.get("zero_optimization", {}).get("stage") == 0 and cfg["fp16"]["enabled"] is True
    assert "fp16" in cfg and cfg.get("nothing", 5) == 5 and dict(cfg)["train_batch_size"] == 4
    with pytest.raises(KeyError):
        cfg["nothing"]


@pytest.mark.parametrize("precision,accum", [({"fp16": {"enabled": True}}, "fp16"),
                                             ({"bf16": {"enabled": True}}, "bf16"), ({}, "bf16")])
def test_grad_accum_dtype_follows_the_master_weights(precision, accum):
    with pytest.warns(ConfigIgnoredKeyWarning, match="data_types.grad_accum_dtype"):
        cfg = load_config(dict(BASE, data_types={"grad_accum_dtype": accum}, **precision))
    assert cfg.precision.grad_accum_dtype == cfg.precision.master_dtype == "fp32"
    cfg = load_config(dict(BASE, zero_optimization={"stage": 1},
                           fp16={"enabled": True, "fp16_master_weights_and_grads": True}))
    assert cfg.precision.grad_accum_dtype == cfg.precision.master_dtype == "fp16"


def test_buffer_dtype_casts_batchnorm_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)  # what the sharding layer does to parameters
    x = torch.randn(4, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        model(x)  # fp32 running statistics against bf16 weights
    keep = load_config(dict(BASE, bf16={"enabled": True})).precision
    assert keep.buffer_dtype is None and cast_buffers(model, keep) == 0
    policy = load_config(dict(BASE, bf16={"enabled": True}, data_types={"buffer_dtype": "bf16"})).precision
    assert cast_buffers(model, policy) == 2  # running_mean, running_var; num_batches_tracked stays int64
    assert model(x).dtype == torch.bfloat16 and model[1].num_batches_tracked.dtype == torch.int64
