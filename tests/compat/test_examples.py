"""DeepSpeedExamples' scripts under the dsrun launcher with 2 CPU ranks (issue 16): cifar, GAN, imagenet and
HelloDeepSpeed, copied into tests/compat/examples/ with only the import lines and the data loading changed
(plus, where a script calls CUDA directly, those calls; each copy's header names its origin and its .diff
records every change). Tiny sizes through the scripts' own command-line arguments, a few steps each."""
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")
UPSTREAM_COMMIT = "45b4b7156c8794a3452a5a7d03dbd8d797068569"
SCRIPTS = {"gan/gan_deepspeed_train.py": "gan/gan_deepspeed_train.diff",
           "cifar/cifar10_deepspeed.py": "cifar/cifar10_deepspeed.diff",
           "imagenet/main.py": "imagenet/main.diff",
           "hello_deepspeed/train_bert_ds.py": "hello_deepspeed/train_bert_ds.diff"}


def _launch(tmp_path, script, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ENV_FILE", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHONPATH=REPO, HOME=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2",
                           os.path.join(EXAMPLES, script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def _floats(pattern, output):
    values = [float(v) for v in re.findall(pattern, output)]
    assert values and all(math.isfinite(v) for v in values), output[-3000:]
    return values


def test_gan_two_engines(tmp_path):
    """Two engines, the generator's backward through the discriminator (runtime/zero/reducer.py's [Note:
    stray gradients]), the upstream config (stage 0, a client torch Adam beside the config's optimizer)."""
    out = _launch(tmp_path, "gan/gan_deepspeed_train.py", "--deepspeed", "--deepspeed_config",
                  os.path.join(EXAMPLES, "gan", "gan_deepspeed_config.json"), "--dataset", "fake", "--workers", "0",
                  "--batchSize", "4", "--nz", "8", "--ngf", "8", "--ndf", "8", "--tensorboard_path", "tb",
                  "--outf", "out")
    assert len(_floats(r"\[rank 0\] \[0/1\]\[\d/2\] Loss_D: ([\d.]+)", out)) == 2
    _floats(r"Loss_G: ([\d.]+)", out)
    assert (tmp_path / "out" / "real_samples.png").exists()


def test_cifar_trains(tmp_path):
    """The config dict of the script (WarmupLR, gradient clipping, overlap_comm, the deprecated
    cpu_offload key), ZeRO stage 1 from its --stage flag; the same two batches each epoch, so the loss of
    each falls from the first epoch to the last."""
    out = _launch(tmp_path, "cifar/cifar10_deepspeed.py", "--deepspeed", "--epochs", "3", "--log-interval", "1",
                  "--dtype", "fp32", "--stage", "1")
    assert len(_floats(r"\[ \d,\s+\d\] loss:\s+([\d.]+)", out)) == 6
    losses = dict(re.findall(r"\[ (\d),\s+1\] loss:\s+([\d.]+)", out))
    assert float(losses["3"]) < float(losses["1"]), out[-3000:]
    assert "Accuracy of the network on the 20 test images" in out


def test_imagenet_resnet18(tmp_path):
    """ResNet-18 (BatchNorm) with a client SGD, the upstream ds_config.json (stage 0, cuda_visible_devices),
    1 epoch of 2 steps, validation with all_reduce, the script's own gather of losses and its checkpoint."""
    out = _launch(tmp_path, "imagenet/main.py", "-a", "resnet18", "--deepspeed", "--deepspeed_config",
                  os.path.join(EXAMPLES, "imagenet", "ds_config.json"), "--multiprocessing_distributed", "--dummy",
                  "-b", "4", "--epochs", "1", "-j", "0", "-p", "1", "--seed", "0", "--lr", "0.01")
    assert len(_floats(r"\[rank 0\] Epoch: \[0\]\[\d/2\].*?Loss ([\d.e+-]+)", out)) == 2
    assert (tmp_path / "Acc_loss_log.xlsx").exists() and (tmp_path / "checkpoint.pth.tar").exists()


def test_hello_deepspeed_bert(tmp_path):
    """The Roberta MLM of HelloDeepSpeed (tied embedding and decoder weights) from a tiny transformers
    config, with the script's own config: bf16, ZeRO stage 1, optimizer offload to CPU; it saves a
    checkpoint with client state at the end."""
    out = _launch(tmp_path, "hello_deepspeed/train_bert_ds.py", "--checkpoint_dir", "exp", "--num_layers", "1",
                  "--num_heads", "2", "--ff_dim", "32", "--h_dim", "16", "--batch_size", "2",
                  "--max_seq_length", "32", "--num_iterations", "4", "--log_every", "1")
    assert len(_floats(r"Loss: ([\d.]+)", out)) == 3
    saved = [d for d in (tmp_path / "exp").iterdir() if (d / "latest").exists()]
    assert saved and (saved[0] / "global_step3").is_dir(), out[-3000:]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_copies_name_their_origin_and_record_their_changes(script):
    text = open(os.path.join(EXAMPLES, script)).read()
    assert "github.com/deepspeedai/DeepSpeedExamples" in text and UPSTREAM_COMMIT in text
    diff = open(os.path.join(EXAMPLES, SCRIPTS[script])).read().splitlines()
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    assert added and all(line in text.splitlines() for line in added)
    assert text.count("# dsrun") >= 2
