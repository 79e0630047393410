"""A training script written for DeepSpeed (the shape of DeepSpeedExamples' cifar10_deepspeed.py), with
only the import line changed: `import deepspeed` -> `import dsrun as deepspeed` and `deepspeed.X` ->
`dsrun.X` in the `from` imports. Synthetic data of a small shape; nothing downloaded."""
import argparse

import torch

import dsrun as deepspeed
import dsrun.comm as dist
from dsrun.accelerator import get_accelerator
from dsrun.moe.utils import split_params_into_different_moe_groups_for_optimizer
from dsrun.runtime.utils import set_random_seed
from dsrun.utils import RepeatingLoader, logger


def add_argument():
    parser = argparse.ArgumentParser(description="synthetic classification")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("--steps", type=int, default=6)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def main(args):
    deepspeed.init_distributed()
    assert dist.is_initialized() and dist.get_world_size() == 2
    set_random_seed(1234)
    g = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
    net = Net()
    parameters = {"params": [p for p in net.parameters() if p.requires_grad], "name": "parameters"}
    parameters = split_params_into_different_moe_groups_for_optimizer(parameters)
    model_engine, optimizer, trainloader, __ = deepspeed.initialize(args=args, model=net, model_parameters=parameters,
                                                                    training_data=dataset)
    local_device = get_accelerator().device_name(model_engine.local_rank)
    local_rank = model_engine.local_rank
    target_dtype = torch.half if model_engine.fp16_enabled() else (
        torch.bfloat16 if model_engine.bfloat16_enabled() else None)
    criterion = torch.nn.CrossEntropyLoss()
    first = None
    for step, (inputs, labels) in enumerate(RepeatingLoader(trainloader)):
        inputs, labels = inputs.to(local_device), labels.to(local_device)
        if target_dtype is not None:
            inputs = inputs.to(target_dtype)
        loss = criterion(model_engine(inputs).float(), labels)
        model_engine.backward(loss)
        model_engine.step()
        first = loss.item() if first is None else first
        if step + 1 == args.steps * model_engine.gradient_accumulation_steps():
            break
    final = torch.tensor([loss.item()], device=local_device)
    dist.all_reduce(final)
    dist.barrier()
    if dist.get_rank() == 0:
        logger.info(f"rank {local_rank} done")
        print(f"RESULT global_steps={model_engine.global_steps} first={first:.4f} "
              f"final={final.item() / dist.get_world_size():.4f} accelerator={get_accelerator().device_name()}",
              flush=True)


if __name__ == "__main__":
    main(add_argument())
