"""A Hugging Face Trainer run with `TrainingArguments(deepspeed=cfg)`, as users write it, for dsrun's
`deepspeed` alias distribution (compat/deepspeed_dist). Launched by `dsrun --num_gpus 2 hf_trainer.py ...`.

A 2-layer GPT-2 built from a config (nothing downloaded) learns synthetic repeating token sequences.
`--resume` continues from the newest checkpoint in --output_dir. Rank 0 prints one line last:
`HF_RESULT {"losses": [...], "global_step": N, "resumed_from": step or null, "deepspeed": "<module file>"}`.
Runs on CPU ranks and on GPUs alike (the Trainer picks the device).
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainerCallback, TrainingArguments

VOCAB, SEQ = 64, 16


def ds_config(stage: int) -> dict:
    """A DeepSpeed config as the transformers docs write it: 'auto' wherever the Trainer fills values in."""
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "steps_per_print": float("inf"),
    }


class SyntheticSequences(torch.utils.data.Dataset):
    """Sequences counting up from a random start modulo VOCAB: learnable in a few steps."""

    def __init__(self, size: int):
        gen = torch.Generator().manual_seed(0)
        starts = torch.randint(0, VOCAB, (size, 1), generator=gen)
        self.ids = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--save_steps", type=int, default=4)
    parser.add_argument("--zero_stage", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--evaluate", action="store_true")
    parser.add_argument("--from_pretrained", default=None, help="a local model folder (save_pretrained) to start from")
    parser.add_argument("--local_rank", type=int, default=-1)  # DeepSpeed-style launchers may pass it
    args = parser.parse_args()

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, save_steps=args.save_steps, save_strategy="steps",
        per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=1,
        logging_steps=1, report_to=[], seed=0, deepspeed=ds_config(args.zero_stage), dataloader_num_workers=0,
        disable_tqdm=True, bf16=args.bf16,
        # Accelerate starts CPU ranks only when told to use the CPU; on GPUs the Trainer picks the device.
        use_cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    # from_config, as users build a fresh model: under ZeRO-3 transformers builds it inside deepspeed.zero.Init.
    if args.from_pretrained:  # under ZeRO-3 loaded into zero.Init-partitioned parameters
        model = AutoModelForCausalLM.from_pretrained(args.from_pretrained)
    else:
        model = AutoModelForCausalLM.from_config(
            GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                       eos_token_id=0))
    log = LossLog()
    trainer = Trainer(model=model, args=training_args, train_dataset=SyntheticSequences(256), callbacks=[log])
    resumed_from = None
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint
        last = get_last_checkpoint(args.output_dir)
        resumed_from = int(last.rsplit("-", 1)[1])
        trainer.train(resume_from_checkpoint=last)
    else:
        trainer.train()
    eval_loss = trainer.evaluate(SyntheticSequences(32))["eval_loss"] if args.evaluate else None
    if trainer.is_world_process_zero():
        import deepspeed
        print("HF_RESULT " + json.dumps({"losses": log.losses, "global_step": trainer.state.global_step,
                                         "resumed_from": resumed_from, "eval_loss": eval_loss,
                                         "engine": type(trainer.model_wrapped).__name__,
                                         "dtype": str(next(trainer.model_wrapped.module.parameters()).dtype), "deepspeed": deepspeed.__file__,
                                         "deepspeed_version": deepspeed.__version__}), flush=True)


if __name__ == "__main__":
    main()
