#!/usr/bin/env python3
# Copied from https://github.com/deepspeedai/DeepSpeedExamples, training/pipeline_parallelism/train.py at
# commit 45b4b7156c8794a3452a5a7d03dbd8d797068569 (Apache-2.0, as the DeepSpeedExamples repository).
# Changed for dsrun's tests (each change is marked `# dsrun:`, and train.diff records them): the import
# lines; the data loading (CIFAR-10 after the script's transforms: 3x224x224 images of 10 classes, 16
# synthetic images, nothing downloaded); torchvision, not installable next to this torch build, is not
# imported: AlexNet and vgg19 come from torchvision_models_standin.py; and, to run on a CPU machine, the
# CUDA-only call (torch.cuda.set_device) goes through get_accelerator().

import os
import argparse

import torch
import torch.distributed as dist

from torchvision_models_standin import AlexNet  # dsrun: torchvision is not installed
from torchvision_models_standin import vgg19  # dsrun: torchvision is not installed

import dsrun as deepspeed  # dsrun: the import lines
from dsrun.pipe import PipelineModule  # dsrun: the import lines
from dsrun.utils import RepeatingLoader  # dsrun: the import lines
from dsrun.accelerator import get_accelerator  # dsrun: CUDA-only calls on a CPU machine


def cifar_trainset(local_rank, dl_path='/tmp/cifar10-data'):

    # Ensure only one rank downloads.
    # Note: if the download path is not on a shared filesytem, remove the semaphore
    # and switch to args.local_rank
    dist.barrier()
    if local_rank != 0:
        dist.barrier()
    g = torch.Generator().manual_seed(0)  # dsrun: synthetic data of the transformed CIFAR-10's shapes
    trainset = torch.utils.data.TensorDataset(torch.randn(16, 3, 224, 224, generator=g),  # dsrun: was CIFAR10
                                              torch.randint(0, 10, (16,), generator=g))  # dsrun: 10 classes
    if local_rank == 0:
        dist.barrier()
    return trainset


def get_args():
    parser = argparse.ArgumentParser(description='CIFAR')
    parser.add_argument('--local_rank',
                        type=int,
                        default=-1,
                        help='local rank passed from distributed launcher')
    parser.add_argument('-s',
                        '--steps',
                        type=int,
                        default=100,
                        help='quit after this many steps')
    parser.add_argument('-p',
                        '--pipeline-parallel-size',
                        type=int,
                        default=2,
                        help='pipeline parallelism')
    parser.add_argument('--backend',
                        type=str,
                        default='nccl',
                        help='distributed backend')
    parser.add_argument('--seed', type=int, default=1138, help='PRNG seed')
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    return args


def train_base(args):
    torch.manual_seed(args.seed)

    # VGG also works :-)
    #net = vgg19(num_classes=10)
    net = AlexNet(num_classes=10)

    trainset = cifar_trainset(args.local_rank)

    engine, _, dataloader, __ = deepspeed.initialize(
        args=args,
        model=net,
        model_parameters=[p for p in net.parameters() if p.requires_grad],
        training_data=trainset)

    dataloader = RepeatingLoader(dataloader)
    data_iter = iter(dataloader)

    rank = dist.get_rank()
    gas = engine.gradient_accumulation_steps()

    criterion = torch.nn.CrossEntropyLoss()

    total_steps = args.steps * engine.gradient_accumulation_steps()
    step = 0
    for micro_step in range(total_steps):
        batch = next(data_iter)
        inputs = batch[0].to(engine.device)
        labels = batch[1].to(engine.device)

        outputs = engine(inputs)
        loss = criterion(outputs, labels)
        engine.backward(loss)
        engine.step()

        if micro_step % engine.gradient_accumulation_steps() == 0:
            step += 1
            if rank == 0 and (step % 10 == 0):
                print(f'step: {step:3d} / {args.steps:3d} loss: {loss}')



def join_layers(vision_model):
    layers = [
        *vision_model.features,
        vision_model.avgpool,
        lambda x: torch.flatten(x, 1),
        *vision_model.classifier,
    ]
    return layers


def train_pipe(args, part='parameters'):
    torch.manual_seed(args.seed)
    deepspeed.runtime.utils.set_random_seed(args.seed)

    #
    # Build the model
    #

    # VGG also works :-)
    #net = vgg19(num_classes=10)
    net = AlexNet(num_classes=10)
    net = PipelineModule(layers=join_layers(net),
                         loss_fn=torch.nn.CrossEntropyLoss(),
                         num_stages=args.pipeline_parallel_size,
                         partition_method=part,
                         activation_checkpoint_interval=0)

    trainset = cifar_trainset(args.local_rank)

    engine, _, _, _ = deepspeed.initialize(
        args=args,
        model=net,
        model_parameters=[p for p in net.parameters() if p.requires_grad],
        training_data=trainset)

    for step in range(args.steps):
        loss = engine.train_batch()


if __name__ == '__main__':
    args = get_args()

    deepspeed.init_distributed(dist_backend=args.backend)
    args.local_rank = int(os.environ['LOCAL_RANK'])
    get_accelerator().set_device(args.local_rank)  # dsrun: was torch.cuda.set_device

    if args.pipeline_parallel_size == 0:
        train_base(args)
    else:
        train_pipe(args)
