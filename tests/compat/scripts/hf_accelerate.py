"""An Accelerate training loop with a DeepSpeed plugin, as users write it, for dsrun's `deepspeed` alias
distribution (compat/deepspeed_dist). Launched by `dsrun --num_gpus 2 hf_accelerate.py ...` or by
`accelerate launch --num_processes 2 hf_accelerate.py ...`.

A 2-layer GPT-2 built from a config (nothing downloaded) learns synthetic repeating token sequences;
`accelerator.save_state` writes DeepSpeed's checkpoint, `load_state` reads it back into a second run of
the loop. Rank 0 prints one line last: `ACC_RESULT {"losses": [...], "engine": "<class>", ...}`.
"""
import argparse
import json

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, set_seed
from transformers import AutoModelForCausalLM, GPT2Config

VOCAB, SEQ = 64, 16


def batches(n: int, micro: int, rank: int):
    gen = torch.Generator().manual_seed(rank)
    for _ in range(n):
        ids = (torch.randint(0, VOCAB, (micro, 1), generator=gen) + torch.arange(SEQ)) % VOCAB
        yield {"input_ids": ids, "labels": ids}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--zero_stage", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=-1)  # DeepSpeed-style launchers may pass it
    args = parser.parse_args()

    if not torch.cuda.is_available():
        # Accelerate starts CPU ranks only when told to use the CPU (PartialState(cpu=True)); an Accelerator
        # made afterwards keeps those ranks and turns DeepSpeed on, as the Trainer does with use_cpu=True.
        PartialState(cpu=True)
    micro, accumulation = 4, 2
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
              "gradient_clipping": 1.0, "steps_per_print": float("inf"),
              "zero_optimization": {"stage": args.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    set_seed(0)
    model = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def train(steps: int, seed_offset: int) -> list:
        losses = []
        for i, batch in enumerate(batches(steps * accumulation, micro, accelerator.process_index + seed_offset)):
            with accelerator.accumulate(model):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if (i + 1) % accumulation == 0:
                losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
        return losses

    def checksum() -> float:
        state = accelerator.get_state_dict(model)  # collective under ZeRO-3; the whole state on rank 0
        return float(sum(t.double().sum() for t in state.values() if t.is_floating_point())) if state else 0.0

    losses = train(args.steps, 0)
    accelerator.save_state(args.output_dir)
    saved_steps, saved_sum = model.global_steps, checksum()
    more = train(2, 100)
    moved_sum = checksum()
    accelerator.load_state(args.output_dir)
    restored_steps, restored_sum = model.global_steps, checksum()
    if accelerator.is_main_process:
        import deepspeed
        print("ACC_RESULT " + json.dumps({
            "losses": losses, "more": more, "saved_steps": saved_steps, "restored_steps": restored_steps,
            "weights_moved": moved_sum != saved_sum, "weights_restored": restored_sum == saved_sum,
            "engine": type(model).__module__ + "." + type(model).__name__,
            "is_deepspeed_engine": isinstance(model, deepspeed.DeepSpeedEngine),
            "distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
            "deepspeed": deepspeed.__file__}), flush=True)


if __name__ == "__main__":
    main()
