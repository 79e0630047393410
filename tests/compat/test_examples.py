"""DeepSpeedExamples' scripts under the dsrun launcher with 2 CPU ranks (issue 16): cifar, GAN, imagenet,
HelloDeepSpeed and the pipeline (AlexNet) example, copied into tests/compat/examples/ with only the import lines and the data loading changed
(plus, where a script calls CUDA directly, those calls; each copy's header names its origin and its .diff
records every change). Tiny sizes through the scripts' own command-line arguments, a few steps each."""
import json
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
           "hello_deepspeed/train_bert_ds.py": "hello_deepspeed/train_bert_ds.diff",
           "pipeline/train.py": "pipeline/train.diff"}


def _launch(tmp_path, script, *args, ranks=2, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ENV_FILE", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHONPATH=REPO, HOME=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", str(ranks),
                           os.path.join(EXAMPLES, script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def _floats(pattern, output):
    values = [float(v) for v in re.findall(pattern, output)]
    assert values and all(math.isfinite(v) for v in values), output[-3000:]
    return values


@pytest.mark.slow
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


@pytest.mark.slow
def test_cifar_trains(tmp_path):
    """The config dict of the script (WarmupLR, gradient clipping, overlap_comm, the deprecated
    cpu_offload key), ZeRO stage 1 from its --stage flag; the same two batches each epoch, so their summed
    loss falls from the first epoch to the last."""
    out = _launch(tmp_path, "cifar/cifar10_deepspeed.py", "--deepspeed", "--epochs", "8", "--log-interval", "1",
                  "--dtype", "fp32", "--stage", "1")
    assert len(_floats(r"\[\s*\d+,\s+\d\] loss:\s+([\d.]+)", out)) == 16
    # the script seeds nothing; WarmupLR starts at 0, so the loss moves by ~0.01 in 8 epochs (printed to 0.001)
    epoch = {}
    for e, loss in re.findall(r"\[\s*(\d+),\s+\d\] loss:\s+([\d.]+)", out):
        epoch[e] = epoch.get(e, 0.0) + float(loss)
    assert epoch["8"] < epoch["1"], out[-3000:]
    assert "Accuracy of the network on the 20 test images" in out


@pytest.mark.slow
def test_imagenet_resnet18(tmp_path):
    """ResNet-18 (BatchNorm) with a client SGD, the upstream ds_config.json (stage 0, cuda_visible_devices),
    1 epoch of 2 steps, validation with all_reduce, the script's own gather of losses and its checkpoint."""
    out = _launch(tmp_path, "imagenet/main.py", "-a", "resnet18", "--deepspeed", "--deepspeed_config",
                  os.path.join(EXAMPLES, "imagenet", "ds_config.json"), "--multiprocessing_distributed", "--dummy",
                  "-b", "4", "--epochs", "1", "-j", "0", "-p", "1", "--seed", "0", "--lr", "0.01")
    assert len(_floats(r"\[rank 0\] Epoch: \[0\]\[\d/2\].*?Loss ([\d.e+-]+)", out)) == 2
    assert (tmp_path / "Acc_loss_log.xlsx").exists() and (tmp_path / "checkpoint.pth.tar").exists()


@pytest.mark.slow
def test_hello_deepspeed_bert_saves_and_resumes_on_more_ranks(tmp_path):
    """The Roberta MLM of HelloDeepSpeed (tied embedding and decoder weights) from a tiny transformers
    config, with the script's own config: bf16, ZeRO stage 1, optimizer offload to CPU; it saves a
    checkpoint with client state, which the 2-rank run resumes (`--load_checkpoint_dir`). The first run
    has 1 rank: the script names its experiment folder after each rank's clock second, so 2 ranks
    starting a second apart would save into two folders."""
    tiny = ["--num_layers", "1", "--num_heads", "2", "--ff_dim", "32", "--h_dim", "16", "--batch_size", "2",
            "--max_seq_length", "32", "--log_every", "1"]
    _launch(tmp_path, "hello_deepspeed/train_bert_ds.py", "--checkpoint_dir", "exp", "--num_iterations", "3",
            *tiny, ranks=1)
    [exp] = (tmp_path / "exp").iterdir()
    assert (exp / "latest").read_text().strip() == "global_step2"
    out = _launch(tmp_path, "hello_deepspeed/train_bert_ds.py", "--load_checkpoint_dir", str(exp),
                  "--num_iterations", "6", *tiny)
    assert len(_floats(r"Loss: ([\d.]+)", out)) == 2  # steps 4 and 5 after the saved checkpoint_step 3
    assert (exp / "latest").read_text().strip() == "global_step4", out[-3000:]


@pytest.mark.slow
def test_pipeline_alexnet_two_stages(tmp_path):
    """training/pipeline_parallelism: torchvision's AlexNet flattened by the script's `join_layers` (a
    lambda among the layers) into a 2-stage PipelineModule partitioned by parameters, trained by
    `train_batch()` from `training_data=`. The upstream ds_config.json with the batch made small (256
    images in micro-batches of 8 is 32 AlexNet micro-batches a step); `--backend gloo` is the script's
    own flag (its default, nccl, needs CUDA). The script prints nothing itself: the losses are dsrun's
    progress lines, one per train_batch."""
    cfg = json.load(open(os.path.join(EXAMPLES, "pipeline", "ds_config.json")))
    cfg.update(train_batch_size=4, train_micro_batch_size_per_gpu=2, steps_per_print=1)
    (tmp_path / "ds_config.json").write_text(json.dumps(cfg))
    out = _launch(tmp_path, "pipeline/train.py", "--deepspeed_config", "ds_config.json", "-p", "2", "--steps", "3",
                  "--backend", "gloo")
    assert len(_floats(r"\[rank 0\] step \d \| loss ([\d.]+)", out)) == 3
    assert (tmp_path / "output" / "deepspeed_metrics" / "training_metrics.csv").read_text().count("\n") == 4


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_copies_name_their_origin_and_record_their_changes(script):
    text = open(os.path.join(EXAMPLES, script)).read()
    assert "github.com/deepspeedai/DeepSpeedExamples" in text and UPSTREAM_COMMIT in text
    diff = open(os.path.join(EXAMPLES, SCRIPTS[script])).read().splitlines()
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    assert added and all(line in text.splitlines() for line in added)
    assert text.count("# dsrun") >= 2
