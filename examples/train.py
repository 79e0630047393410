"""A small DeepSpeed-style training script: regression with an MLP on synthetic data.

Written exactly as for DeepSpeed; only the import differs. Run it with

    dsrun --num_gpus 2 examples/train.py --deepspeed_config examples/ds_config.json

On a machine without GPUs, `--num_gpus 2` starts two CPU ranks that train over gloo. Rank 0 prints a
progress line every `steps_per_print` steps (a live panel when run on a terminal without the launcher)
and leaves output/deepspeed_metrics/ (training_metrics.csv, training_curves.png, summary.json,
deepspeed_config_auto.json) in the working directory; see docs/monitoring.md.
"""
import argparse

import torch

import dsrun as deepspeed


def synthetic_dataset(num_samples=2048, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = torch.tanh(x @ w) + 0.01 * torch.randn(num_samples, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num_samples", type=int, default=2048, help="size of the synthetic data set")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    engine, _, loader, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters(),
                                                training_data=synthetic_dataset(args.num_samples))
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(engine.device), y.to(engine.device)
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            total, count = total + loss.item(), count + 1
        if engine.global_rank == 0:
            print(f"epoch {epoch} step {engine.global_steps} mean loss {total / count:.4f} "
                  f"lr {engine.get_lr()[0]:.2e}", flush=True)
    engine.destroy()


if __name__ == "__main__":
    main()
